"""Locust load for a lorafleet server: POST /v1/generate with a random adapter from a list.

    locust -f lorafleet/devtools/locustfile.py --headless -u 8 -r 8 -t 30s --host http://127.0.0.1:8000

Environment:
    LORAFLEET_LOAD_ADAPTERS   comma-separated refs; "base" means no adapter (default: base)
    LORAFLEET_LOAD_STEPS, LORAFLEET_LOAD_SIZE   request steps and square size (default 1, 32)
    LORAFLEET_LOAD_TOKEN      bearer token, if the server wants one
    LORAFLEET_LOAD_WAIT_S     pause between a user's requests (default 0)
    LORAFLEET_LOAD_MAX_REQUESTS   stop the run after this many requests (default: run for -t)
    LORAFLEET_LOAD_LOG        write one JSON line per request (status, seconds, Retry-After) here
"""

from __future__ import annotations

import json
import os
import random
import time

import gevent
from locust import HttpUser, between, events, task
from locust.exception import StopUser

ADAPTERS = [a.strip() for a in os.environ.get("LORAFLEET_LOAD_ADAPTERS", "base").split(",") if a.strip()]
STEPS = int(os.environ.get("LORAFLEET_LOAD_STEPS", "1"))
SIZE = int(os.environ.get("LORAFLEET_LOAD_SIZE", "32"))
TOKEN = os.environ.get("LORAFLEET_LOAD_TOKEN")
WAIT_S = float(os.environ.get("LORAFLEET_LOAD_WAIT_S", "0"))
MAX_REQUESTS = int(os.environ.get("LORAFLEET_LOAD_MAX_REQUESTS", "0"))
LOG_PATH = os.environ.get("LORAFLEET_LOAD_LOG")
REQUEST_TIMEOUT_S = 120

_rows: list[dict] = []


class Generator(HttpUser):
    wait_time = between(WAIT_S, WAIT_S * 1.5) if WAIT_S else between(0, 0)

    @task
    def generate(self) -> None:
        if MAX_REQUESTS and len(_rows) >= MAX_REQUESTS:
            gevent.spawn(self.environment.runner.quit)  # not from this user's own greenlet
            raise StopUser()
        ref = random.choice(ADAPTERS)
        body = {"prompt": "a red circle on the left", "steps": STEPS, "width": SIZE, "height": SIZE,
                "seed": random.randrange(2**32)}
        if ref != "base":
            body["adapter"] = ref
        headers = {"Authorization": f"Bearer {TOKEN}"} if TOKEN else {}
        started = time.perf_counter()
        with self.client.post("/v1/generate", json=body, headers=headers, timeout=REQUEST_TIMEOUT_S,
                              catch_response=True, name="generate") as response:
            _rows.append({"status": response.status_code, "seconds": time.perf_counter() - started,
                          "retry_after": response.headers.get("Retry-After"), "adapter": ref,
                          "error_code": _error_code(response)})
            if response.status_code == 503 and response.headers.get("Retry-After"):
                response.failure("overloaded (503 with Retry-After)")


def _error_code(response) -> str | None:
    if response.status_code < 400:
        return None
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return "unparseable"


@events.quitting.add_listener
def _write_log(environment, **_) -> None:
    if LOG_PATH:
        with open(LOG_PATH, "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in _rows)
