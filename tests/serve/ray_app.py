"""A lorafleet Ray Serve app for tests (the ``live`` fixture in conftest.py): its tokens and calls."""

from __future__ import annotations

import httpx
import psutil
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
