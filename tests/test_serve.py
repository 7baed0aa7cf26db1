"""`fairway serve` on the shipped config.toml: the embedded default a newcomer starts."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_serve_embedded_default() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "serve",
            "--config",
            str(ROOT / "config.toml"),
            "--port",
            str(port),
        ],
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz") as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, "gateway did not come up"
            time.sleep(0.1)
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-globex-chat", max_retries=0
        )
        assert {m.id for m in client.models.list().data} == {"llama-3.1-8b", "mistral-7b"}
        stream = client.chat.completions.create(
            model="mistral-7b",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            stream=True,
        )
        assert sum(1 for c in stream if c.choices and c.choices[0].delta.content) >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        stderr = proc.stderr.read().decode() if proc.stderr else ""
    # One JSON log line per request, naming tenant, app and engine; never the key.
    lines = [ln for ln in stderr.splitlines() if '"event":"request"' in ln]
    assert len(lines) == 1
    assert '"tenant":"globex"' in lines[0] and '"app":"chat"' in lines[0]
    assert "sk-globex-chat" not in stderr
