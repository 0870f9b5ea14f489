"""End to end through a real Ray Serve app on loopback: 2 generator replicas, an S3 registry."""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import time

import httpx
import numpy as np
import psutil
import pytest
from conftest import GUIDANCE, PROMPT, STEPS, plain_diffusers_image
from lorafleet.registry import AdapterRegistry, PublishRequest

pytestmark = pytest.mark.slow
ADMIN = {"Authorization": "Bearer admin-token"}
GENERATE = {"Authorization": "Bearer gen-token"}
RAY_PROCESS_NAMES = ("raylet", "gcs_server")


def _ray_children() -> list[str]:
    names = []
    for child in psutil.Process().children(recursive=True):
        try:
            names.append(child.name())
        except psutil.NoSuchProcess:
            continue
    return [n for n in names if any(r in n for r in RAY_PROCESS_NAMES)]


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    from lorafleet.devtools.seaweed import start_seaweed

    server = start_seaweed(tmp_path_factory.mktemp("ray-s3"))
    server.create_bucket("serve")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def live(s3_server, tiny_spec, tmp_path_factory):
    """The registry, the running server's URL, and the adapters' pulled files."""
    from helpers import write_lora
    from lorafleet.serve.server import start_server
    from lorafleet.serve.settings import ServeSettings

    from lorafleet.devtools.seaweed import free_port

    saved = {k: os.environ.get(k) for k in [*s3_server.env(), "LORAFLEET_S3_CONNECT_TIMEOUT",
                                            "LORAFLEET_S3_MAX_ATTEMPTS"]}
    os.environ.update(s3_server.env(), LORAFLEET_S3_CONNECT_TIMEOUT="1", LORAFLEET_S3_MAX_ATTEMPTS="1")
    root = tmp_path_factory.mktemp("ray-e2e")
    registry = AdapterRegistry("s3://serve/adapters")
    for index in range(7):
        path = write_lora(root / f"src{index}", tiny_spec, seed=40 + index)
        registry.publish(path, PublishRequest(name=f"look{index}", base=tiny_spec, aliases=["prod"]))
    files = {f"look{i}": registry.pull(f"look{i}", root / "pulled")[1] for i in range(7)}
    settings = ServeSettings(
        registry=registry.uri, port=free_port(), replicas=2, replica_num_cpus=0.5, fuse_after=3,
        resolution_ttl_s=1.0, auth_enabled=True, api_tokens="gen-token=generate,admin-token=admin",
        cache={"disk_dir": str(root / "cache"), "active_max_adapters": 2},
    )
    server = start_server(settings, num_cpus=2)
    try:
        yield registry, server.url, files
    finally:
        server.stop()
        deadline = time.monotonic() + 30
        while _ray_children() and time.monotonic() < deadline:
            time.sleep(0.5)
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    assert _ray_children() == [], "Ray processes left behind"


def _samples(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _generate(url, headers=GENERATE, **fields):
    body = {"prompt": PROMPT, "steps": STEPS, "guidance_scale": GUIDANCE, "seed": 0, "output_format": "npy",
            **fields}
    return httpx.post(f"{url}/v1/generate", json=body, headers=headers, timeout=120)


def _image(response) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(response.json()["images"][0])), allow_pickle=False)[None][0]


def test_correctness_invariant_over_20_requests_5_adapters_2_replicas(live):
    _, url, files = live
    references = {name: plain_diffusers_image(files[name]) for name in [f"look{i}" for i in range(5)]}
    sequence = ["look0", "look1", "look0", "look2", "look3", "look3", "look3", "look3", "look4", "look0",
                "look1", "look1", "look1", "look1", "look2", "look4", "look0", "look3", "look2", "look1"]
    replicas = set()
    for name in sequence:
        response = _generate(url, adapter=name)
        assert response.status_code == 200, response.text
        replicas.add(response.json()["replica"])
        assert np.abs(_image(response) - references[name]).max() <= 1e-4, name
    assert len(replicas) == 2
    metrics = _samples(httpx.get(f"{url}/metrics").text)
    assert metrics[("lorafleet_fuse_events_total", (("event", "fuse"),))] > 0  # fusing and
    assert metrics[("lorafleet_cache_evictions_total", (("tier", "active"),))] > 0  # eviction happened


def test_errors_over_http(live):
    _, url, _ = live
    assert _generate(url, adapter="nope").status_code == 404
    assert _generate(url, adapter="look0@9").status_code == 404
    assert _generate(url, steps=999).json()["error"]["field"] == "steps"
    assert _generate(url, headers={}).status_code == 401
    assert _generate(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    moved = httpx.put(f"{url}/v1/adapters/look0/aliases/canary", json={"version": 1}, headers=GENERATE)
    assert moved.status_code == 403


def test_alias_move_is_seen_without_restart(live, tiny_spec, tmp_path):
    from helpers import write_lora

    registry, url, _ = live
    second = registry.publish(write_lora(tmp_path, tiny_spec, seed=99), PublishRequest(name="look5", base=tiny_spec))
    assert _generate(url, adapter="look5:prod").json()["adapters"][0]["version"] == 1
    moved = httpx.put(f"{url}/v1/adapters/look5/aliases/prod", json={"version": 2, "expected_version": 1},
                      headers=ADMIN)
    assert moved.status_code == 200, moved.text
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        served = _generate(url, adapter="look5:prod").json()["adapters"][0]
        if served["version"] == 2:
            break
        time.sleep(0.3)
    assert served["digest"] == second.digest


def test_metrics_from_the_ray_app_pass_promtool(live):
    _, url, _ = live
    text = httpx.get(f"{url}/metrics").text
    assert 'lorafleet_adapter_loads_total{tier="registry"}' in text
    result = subprocess.run([shutil.which("promtool"), "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_registry_outage_cached_adapters_keep_serving(live, s3_server):
    _, url, _ = live
    assert _generate(url, adapter="look1").status_code == 200  # cached on a replica
    s3_server.stop()
    try:
        started = time.monotonic()
        for _ in range(3):
            assert _generate(url, adapter="look1").status_code == 200
        cold = _generate(url, adapter="look6")  # never fetched: needs the registry
        assert cold.status_code == 503, cold.text
        assert cold.headers.get("Retry-After") and time.monotonic() - started < 60
        ready = httpx.get(f"{url}/readyz").json()
        assert ready["mode"] == "cached-only" and ready["registry_reachable"] is False
    finally:
        s3_server.restart()
    deadline = time.monotonic() + 30
    while _generate(url, adapter="look6").status_code != 200 and time.monotonic() < deadline:
        time.sleep(1)
    assert _generate(url, adapter="look6").status_code == 200
