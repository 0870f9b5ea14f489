"""Schemathesis against the live server's /openapi.json: every check, hundreds of generated cases,
auth on and off. No 5xx; every response conforms to the schema; every request the schema
allows is accepted and every one it forbids is refused."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import soak_scaled
from reliability_setup import TOKENS

pytestmark = pytest.mark.slow  # live servers and load: `make test-fast` skips them

EXAMPLES_PER_OPERATION = soak_scaled(40, 300)


def _schemathesis(url: str, *headers: str, seed: int) -> tuple[subprocess.CompletedProcess, float]:
    command = [str(Path(sys.executable).parent / "st"), "--config-file", str(Path(__file__).with_name(
        "schemathesis.toml")), "run", f"{url}/openapi.json", "--checks", "all",
               "--max-examples", str(EXAMPLES_PER_OPERATION), "--workers", "1", "--seed", str(seed),
               "--request-timeout", "60"]
    for header in headers:
        command += ["--header", header]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    return result, time.perf_counter() - started


@pytest.mark.parametrize("auth", ["on", "off"])
def test_schemathesis_finds_nothing(auth, looks_registry, live_server, record):
    settings = {"auth_enabled": True, "api_tokens": TOKENS} if auth == "on" else {}
    # Trainings on (their routes fuzzed too; the job server is never reached: nothing here runs).
    trainings = {"ray_address": "http://127.0.0.1:9", "max_upload_bytes": 1_000_000}
    server = live_server(looks_registry, trainings=trainings, **settings)
    headers = ["Authorization: Bearer admin-token-0123456789abcdef0123456789"] if auth == "on" else []
    result, seconds = _schemathesis(server.url, *headers, seed=1234)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    generated = int(re.search(r"(\d+) generated", output).group(1))
    passed = int(re.search(r"\d+ generated, (\d+) passed", output).group(1))
    assert generated >= 300 and passed == generated, output[-3000:]
    assert server.process.poll() is None, "the server died"
    assert "Traceback" not in server.log(), server.log()[-3000:]
    record(f"schemathesis, auth {auth}", {"checks": "all", "max_examples_per_operation": EXAMPLES_PER_OPERATION},
           {"cases": generated, "failures": 0, "server_errors": 0, "seconds": round(seconds, 1)})
