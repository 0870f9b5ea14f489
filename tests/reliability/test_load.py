"""Locust (headless, loopback) against a live server with mixed adapters, below and above capacity.

Capacity of the server here: one replica generating one request at a time, ``QUEUE`` waiting.
Below it (fewer users than slots) every request succeeds; above it the excess is refused at once
with 503 + Retry-After, nothing hangs, and the server's memory stays bounded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
from helpers import soak_scaled
from reliability_setup import LOOKS

pytestmark = pytest.mark.slow  # live servers and load: `make test-fast` skips them

QUEUE = 4
MIXED = ",".join(["base", *(f"{name}:prod" for name in LOOKS), f"{LOOKS[0]}@1"])
RSS_REQUESTS = soak_scaled(1000, 5000)
RSS_GROWTH_LIMIT_MB = 64


def _locust(url: str, tmp_path: Path, users: int, seconds: int, max_requests: int = 0) -> list[dict]:
    locustfile = find_spec("lorafleet.devtools.locustfile").origin  # not imported here: locust patches gevent
    log = tmp_path / f"locust-{users}-{max_requests}.jsonl"
    env = {**os.environ, "LORAFLEET_LOAD_ADAPTERS": MIXED, "LORAFLEET_LOAD_LOG": str(log),
           "LORAFLEET_LOAD_MAX_REQUESTS": str(max_requests)}
    command = [str(Path(sys.executable).parent / "locust"), "-f", locustfile, "--headless", "-u", str(users),
               "-r", str(users), "-t", f"{seconds}s", "--stop-timeout", "30", "--host", url, "--only-summary",
               "--exit-code-on-error", "0", "--loglevel", "WARNING"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds + 120)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in log.read_text().splitlines()]


def _figures(rows: list[dict]) -> dict:
    seconds = np.array([r["seconds"] for r in rows if r["status"] == 200] or [0.0])
    refused = [r["seconds"] for r in rows if r["status"] == 503]
    return {"requests": len(rows), "ok": sum(r["status"] == 200 for r in rows), "503": len(refused),
            "other_errors": sum(r["status"] not in (200, 503) for r in rows),
            "p50_ms": round(1000 * float(np.percentile(seconds, 50)), 1),
            "p99_ms": round(1000 * float(np.percentile(seconds, 99)), 1),
            "slowest_503_ms": round(1000 * max(refused), 1) if refused else None}


def test_below_capacity_every_request_succeeds(looks_registry, live_server, tmp_path, record):
    server = live_server(looks_registry, max_ongoing_requests=1, max_queued_requests=QUEUE)
    rows = _locust(server.url, tmp_path, users=QUEUE, seconds=soak_scaled(15, 120))
    figures = _figures(rows)
    assert figures["requests"] >= 50 and figures["ok"] == figures["requests"], figures
    record("locust below capacity", {"users": QUEUE, "queue": QUEUE, "adapters": MIXED}, figures)


def test_above_capacity_the_excess_gets_503_with_retry_after_fast(looks_registry, live_server, tmp_path, record):
    users = 4 * QUEUE
    server = live_server(looks_registry, max_ongoing_requests=1, max_queued_requests=QUEUE)
    rows = _locust(server.url, tmp_path, users=users, seconds=soak_scaled(15, 120))
    figures = _figures(rows)
    assert figures["ok"] >= 20 and figures["503"] >= 20 and figures["other_errors"] == 0, figures
    refused = [r for r in rows if r["status"] == 503]
    assert all(r["retry_after"] == "1" and r["error_code"] == "overloaded" for r in refused)
    assert figures["slowest_503_ms"] < 1000, figures
    assert server.process.poll() is None
    record("locust above capacity", {"users": users, "queue": QUEUE, "adapters": MIXED}, figures)


def test_memory_stays_bounded_over_many_requests(looks_registry, live_server, tmp_path, record):
    server = live_server(looks_registry, max_ongoing_requests=1, max_queued_requests=QUEUE)
    _locust(server.url, tmp_path, users=2, seconds=60, max_requests=100)  # every adapter loaded once
    before = server.rss_mb()
    rows = _locust(server.url, tmp_path, users=2, seconds=600, max_requests=RSS_REQUESTS)
    after = server.rss_mb()
    figures = _figures(rows)
    assert figures["requests"] >= RSS_REQUESTS and figures["ok"] == figures["requests"], figures
    growth = after - before
    assert growth < RSS_GROWTH_LIMIT_MB, f"RSS grew {growth:.1f} MB over {len(rows)} requests"
    record("locust memory", {"requests": RSS_REQUESTS, "users": 2, "limit_mb": RSS_GROWTH_LIMIT_MB},
           {**figures, "rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1),
            "rss_growth_mb": round(growth, 1)})
