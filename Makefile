# The two commands of the README:
#   make serve   set up .venv if needed, then run the gateway on config.toml
#   make test    set up .venv if needed, then lint, type-check and run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fairway-installed

.PHONY: setup serve test lint typecheck pytest bench bench-all bench-routing bench-routing-live clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

serve: setup
	$(BIN)/fairway serve --config config.toml

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

pytest: setup
	$(BIN)/pytest -q

test: lint typecheck pytest

bench: setup
	$(BIN)/python benchmarks/gateway_overhead.py

# The same benchmark with LiteLLM's proxy and vllm-router in front of the same engines, each
# installed from PyPI into its own virtualenv under .bench/.
OTHERS := .bench
bench-all: setup $(OTHERS)/litellm/bin/litellm $(OTHERS)/vllm-router/bin/vllm-router
	$(BIN)/python benchmarks/gateway_overhead.py --litellm $(OTHERS)/litellm/bin/litellm \
		--vllm-router $(OTHERS)/vllm-router/bin/vllm-router

$(OTHERS)/litellm/bin/litellm:
	$(PYTHON) -m venv $(OTHERS)/litellm
	$(OTHERS)/litellm/bin/pip install --quiet 'litellm[proxy]'

$(OTHERS)/vllm-router/bin/vllm-router:
	$(PYTHON) -m venv $(OTHERS)/vllm-router
	$(OTHERS)/vllm-router/bin/pip install --quiet vllm-router

clean:
	rm -rf $(VENV) $(OTHERS) .pytest_cache .mypy_cache .ruff_cache *.egg-info

# Routing: every policy on the Azure trace in the cluster simulator, the predictor's accuracy,
# the decision cost (docs/ROUTING.md); then the live replay through the gateway.
bench-routing: setup
	$(BIN)/python benchmarks/routing_bench.py

bench-routing-live: setup
	$(BIN)/python benchmarks/routing_live.py
