"""The OpenAPI document: served at /openapi.json, kept up to date in docs/openapi.json, and
naming every route the gateway has."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import aiohttp

from gateway.http.openapi import document, dumps
from tests.conftest import GatewayFactory, config_dict

DOC = Path(__file__).parent.parent / "docs" / "openapi.json"


def test_the_file_is_up_to_date() -> None:
    assert DOC.read_bytes() == dumps(), (
        "docs/openapi.json is stale: python -m gateway.http.openapi > docs/openapi.json"
    )


def test_the_generator_command_writes_the_file() -> None:
    out = subprocess.run([sys.executable, "-m", "gateway.http.openapi"], capture_output=True,
                         check=True, cwd=DOC.parent.parent).stdout  # fmt: skip
    assert out == DOC.read_bytes()


async def test_served_document_equals_the_file(
    start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    server, _ = await start_gateway(config_dict())
    async with http.get(server.make_url("/openapi.json")) as r:
        assert r.status == 200
        assert r.content_type == "application/json"
        assert await r.read() == DOC.read_bytes()


async def test_every_route_is_described(start_gateway: GatewayFactory) -> None:
    server, _ = await start_gateway(config_dict())
    routes = {
        (r.method.lower(), r.resource.canonical.replace("{id:.+}", "{id}"))
        for r in server.app.router.routes()
        if r.method != "HEAD" and r.resource is not None
    }
    described = {(m, p) for p, ops in document()["paths"].items() for m in ops}
    assert routes == described


def test_the_document_is_valid_openapi() -> None:
    import pytest

    schemathesis = pytest.importorskip("schemathesis")
    schema = schemathesis.openapi.from_dict(json.loads(DOC.read_bytes()))
    schema.validate()
    ops = [r.ok() for r in schema.get_all_operations()]
    assert len(ops) == 13
    for op in ops:
        assert all(str(s).isdigit() or s == "default" for s in op.definition.raw["responses"])
