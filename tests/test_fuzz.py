"""Schemathesis against the running gateway, from the document it serves at /openapi.json.

Every operation gets valid and invalid requests (bodies, headers, query and path parameters,
keys right, wrong and missing): no 5xx, every error OpenAI-shaped, responses as documented, the
gateway healthy and its ledger at zero afterwards. The fleet-changing admin operations run
against a gateway of their own. Cases that ever failed live in tests/fuzz_corpus/ and are
replayed by `test_corpus`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.http.auth import digest
from gateway.http.state import Gateway
from tests.conftest import ACME, MODEL, GatewayFactory, config_dict

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

ADMIN = "sk-test-admin"
CORPUS = Path(__file__).parent / "fuzz_corpus"
BUDGET_S = 60.0  # all operations together; the rest are skipped once it is spent
FLEET_OPS = {"POST /admin/engines", "POST /admin/engines/{id}/drain", "DELETE /admin/engines/{id}",
             "POST /admin/reload"}  # fmt: skip
EXAMPLES = {"POST /v1/chat/completions": 120, "POST /v1/completions": 80, "POST /admin/engines": 30}


def fuzz_config() -> dict[str, Any]:
    cfg = config_dict()
    cfg["admin"] = {"keys": [{"sha256": digest(ADMIN)}]}
    cfg["sim"]["time_scale"] = 0.002
    return cfg


def error_shape(status: int, body: bytes) -> str | None:
    """Why an error body is not `{"error": {message, type, param, code}}`, or None."""
    try:
        doc = json.loads(body)
    except ValueError:
        return f"{status} with a body that is not JSON: {body[:200]!r}"
    err = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(err, dict):
        return f"{status} without an error object: {body[:200]!r}"
    if set(err) < {"message", "type", "param", "code"}:
        return f"{status} error lacks {sorted({'message', 'type', 'param', 'code'} - set(err))}"
    if not isinstance(err["message"], str) or not isinstance(err["type"], str):
        return f"{status} error message and type must be strings: {err!r}"
    if not all(err[k] is None or isinstance(err[k], str) for k in ("param", "code")):
        return f"{status} error param and code must be strings or null: {err!r}"
    return None


def idle(gw: Gateway) -> bool:
    return gw.gate.core.ledger.total() == 0 and gw.gate.core.slots == {}


async def settle(gw: Gateway, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not idle(gw):
        assert time.monotonic() < deadline, (
            f"ledger not at zero: {gw.gate.core.ledger.total()} in flight, "
            f"{len(gw.gate.core.slots)} slots"
        )
        await asyncio.sleep(0.05)


def _auth(op: Any, choice: int, headers: dict[str, Any]) -> None:
    """Mostly the right key for the operation; sometimes the generated one, or none."""
    security = op.definition.raw.get("security")
    if security == [] or choice == 0:
        return
    if choice == 1:
        headers.pop("Authorization", None)
        return
    key = ADMIN if security == [{"AdminKey": []}] else ACME
    headers["Authorization"] = f"Bearer {key}"


def fuzz(schema: Any, urls: dict[str, str], ids: list[str]) -> tuple[list[dict[str, Any]], dict]:
    """Runs in a thread while the gateways serve on the test's loop; returns the failures and
    how many cases each operation got."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.errors import FailureGroup
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]  # fmt: skip
    failures: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    start = time.monotonic()

    def run_one(op: Any, mode: Any, url: str) -> None:
        @given(case=op.as_strategy(generation_mode=mode), auth=st.integers(0, 9),
               known=st.integers(0, 3))  # fmt: skip
        @settings(max_examples=EXAMPLES.get(op.label, 15), deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        def run(case: Any, auth: int, known: int) -> None:
            if time.monotonic() - start > BUDGET_S + 15:
                return
            positive = mode is GenerationMode.POSITIVE
            if positive and known and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = MODEL  # reach an engine, not only the 404
            if known and case.path_parameters and "id" in case.path_parameters:
                case.path_parameters["id"] = ids[known % len(ids)]
            _auth(op, auth, case.headers)
            counts[op.label] = counts.get(op.label, 0) + 1
            response = case.call(base_url=url, timeout=30)
            problems = []
            if response.status_code >= 400 and op.label != "GET /healthz":
                why = error_shape(response.status_code, response.content)
                if why:
                    problems.append(why)
            extra = [negative_data_rejection] if not positive and auth >= 2 else []
            try:
                case.validate_response(response, checks=checks + extra)
            except FailureGroup as exc:
                problems.extend(f.title + ": " + f.message for f in exc.exceptions)
            if problems:
                failures.append(
                    {
                        "operation": op.label,
                        "mode": mode.value,
                        "method": case.method,
                        "path": case.formatted_path,
                        "query": case.query,
                        "headers": dict(case.headers or {}),
                        "body": repr(case.body),
                        "status": response.status_code,
                        "response": response.text[:500],
                        "problems": problems,
                    }
                )

        with contextlib.suppress(Unsatisfiable):  # nothing to make invalid: no parameters
            run()

    for result in schema.get_all_operations():
        op = result.ok()
        url = urls["fleet" if op.label in FLEET_OPS else "main"]
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if time.monotonic() - start > BUDGET_S:
                counts.setdefault(op.label + " (skipped: budget)", 0)
                continue
            run_one(op, mode, url)
    return failures, counts


async def test_fuzz(start_gateway: GatewayFactory, http: aiohttp.ClientSession) -> None:
    main, gw = await start_gateway(fuzz_config())
    fleet, fleet_gw = await start_gateway(fuzz_config())
    async with http.get(main.make_url("/openapi.json")) as r:
        assert r.status == 200
        doc = await r.json()
    schema = schemathesis.openapi.from_dict(doc)
    urls = {
        "main": str(main.make_url("")).rstrip("/"),
        "fleet": str(fleet.make_url("")).rstrip("/"),
    }
    ids = sorted(fleet_gw.registry.engines)
    failures, counts = await asyncio.to_thread(fuzz, schema, urls, ids)
    report = json.dumps(failures[:20], indent=1, ensure_ascii=False, default=str)
    assert not failures, f"{len(failures)} failing cases ({counts}):\n{report}"
    assert all(n > 0 for label, n in counts.items() if "skipped" not in label), counts
    await settle(gw)
    await settle(fleet_gw)
    async with http.get(main.make_url("/healthz")) as r:
        assert r.status == 200, await r.text()


def _corpus() -> list[Any]:
    out = []
    for path in sorted(CORPUS.glob("*.json")):
        case = json.loads(path.read_text())
        marks = [pytest.mark.xfail(reason=case["xfail"], strict=True)] if case.get("xfail") else []
        out.append(pytest.param(case, id=path.stem, marks=marks))
    return out


@pytest.mark.parametrize("case", _corpus())
async def test_corpus(
    case: dict[str, Any], start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    """A case that once failed: no 5xx, an OpenAI-shaped error, the ledger back at zero."""
    server, gw = await start_gateway(fuzz_config())
    await _replay(case, server, gw, http)


async def _replay(
    case: dict[str, Any], server: TestServer, gw: Gateway, http: aiohttp.ClientSession
) -> None:
    for step in case.get("steps", [case]):
        await _send(step, server, http)
    await settle(gw)
    async with http.get(server.make_url("/healthz")) as r:
        assert r.status == 200, await r.text()
    await asyncio.sleep(0.5)  # a few health probes
    await server.close()  # what failed in the background surfaces here


async def _send(step: dict[str, Any], server: TestServer, http: aiohttp.ClientSession) -> None:
    headers = dict(step.get("headers", {}))
    key = {"tenant": ACME, "admin": ADMIN}.get(step.get("key", ""))
    if key:
        headers["Authorization"] = f"Bearer {key}"
    body = step["raw_body"].encode() if "raw_body" in step else None
    if "json" in step:
        body = json.dumps(step["json"]).encode()
        headers.setdefault("Content-Type", "application/json")
    url = server.make_url(step["path"]).with_query(step.get("query", {}))
    async with http.request(step["method"], url, data=body, headers=headers) as r:
        status, raw = r.status, await r.read()
    assert status < 500, (step, status, raw[:500])
    if "status" in step:
        assert status == step["status"], (step, status, raw[:500])
    if status >= 400:
        assert error_shape(status, raw) is None, error_shape(status, raw)
