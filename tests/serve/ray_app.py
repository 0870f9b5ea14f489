"""A lorafleet Ray Serve app for tests (the ``live`` fixture in conftest.py): its tokens and calls."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
from helpers import wait_until_in_flight
from serve_setup import GUIDANCE, PROMPT, STEPS

ADMIN = {"Authorization": "Bearer admin-token-0123456789abcdef0123456789"}
GENERATE = {"Authorization": "Bearer gen-token-0123456789abcdef0123456789"}
TEAM_A = {"Authorization": "Bearer team-a-token-0123456789abcdef01234567"}
TEAM_B = {"Authorization": "Bearer team-b-token-0123456789abcdef01234567"}
TOKENS = ",".join(["gen-token-0123456789abcdef0123456789=generate", "admin-token-0123456789abcdef0123456789=admin",
                   "team-a-token-0123456789abcdef01234567=generate@team-a",
                   "team-b-token-0123456789abcdef01234567=generate@team-b"])
RAY_PROCESS_NAMES = ("raylet", "gcs_server")


def ray_children() -> list[str]:
    names = []
    for child in psutil.Process().children(recursive=True):
        try:
            names.append(child.name())
        except psutil.NoSuchProcess:
            continue
    return [n for n in names if any(r in n for r in RAY_PROCESS_NAMES)]


def generate(url, headers=GENERATE, **fields):
    body = {"prompt": PROMPT, "steps": STEPS, "guidance_scale": GUIDANCE, "seed": 0, "output_format": "npy",
            "cache": False, **fields}  # these tests drive the replicas: repeats must generate, not hit the output cache
    return httpx.post(f"{url}/v1/generate", json=body, headers=headers, timeout=120)


def flood_with_a_quiet_request(url, quiet_adapter: str, flood_adapter: str | None = None):
    """Team A sends 16 requests of 50 steps at once (on ``flood_adapter``, or none); once all are in
    flight, team B sends one of 2 steps on ``quiet_adapter``. Gives (B's response, A's responses)."""
    extra = {"adapter": flood_adapter} if flood_adapter else {}
    with ThreadPoolExecutor(max_workers=16) as pool:
        flood = [pool.submit(generate, url, TEAM_A, steps=50, seed=seed, **extra) for seed in range(16)]
        wait_until_in_flight(lambda: httpx.get(f"{url}/metrics", headers=ADMIN).text, flood)  # in the replicas' passes
        time.sleep(0.3)
        quiet = generate(url, TEAM_B, adapter=quiet_adapter, steps=2, seed=3)
        return quiet, [future.result() for future in flood]
