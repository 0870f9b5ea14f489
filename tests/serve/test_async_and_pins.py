"""Async generation (202 + a job id, results kept in the registry's storage, a signed webhook)
and pinning / pre-warming adapters, through the HTTP API of the in-process app."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient
from helpers import WebhookReceiver, publish_lora
from serve_setup import PROMPT

from lorafleet.registry import AdapterRegistry
from lorafleet.serve.app import create_local_app
from lorafleet.serve.residency import Tier
from lorafleet.serve.settings import ServeSettings
from lorafleet.training.service.webhooks import verify_signature

SECRET = "w" * 24


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_spec):
    root = tmp_path_factory.mktemp("async-pins")
    registry = AdapterRegistry(f"file://{root / 'registry'}")
    for index in range(4):
        publish_lora(registry, tiny_spec, root, name=f"look{index}", seed=index, aliases=["prod"])
    return registry


def _app(registry, tmp_path, **settings):
    settings = ServeSettings(base="tiny", registry=registry.uri, cache={"disk_dir": str(tmp_path / "cache"),
                                                                        **settings.pop("cache", {})}, **settings)
    return create_local_app(settings, registry)


def _wait_job(client, job_id, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job.get("state") in ("succeeded", "failed"):
            return job
        time.sleep(0.1)
    raise AssertionError(job)


def test_async_generation_returns_a_job_whose_result_equals_the_sync_one(registry, tmp_path):
    receiver = WebhookReceiver()
    app, _ = _app(registry, tmp_path, webhooks={"allowed_hosts": ["127.0.0.1"]})  # the receiver is on loopback
    body = {"prompt": PROMPT, "adapter": "look0:prod", "steps": 2, "seed": 3, "cache": False}
    with TestClient(app) as client:
        sync = client.post("/v1/generate", json=body)
        accepted = client.post("/v1/generate", json={**body, "async": True,
                                                     "webhook": {"url": receiver.url, "secret": SECRET}})
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["id"]
        assert accepted.headers["Location"] == f"/v1/jobs/{job_id}"
        job = _wait_job(client, job_id)
        assert job["state"] == "succeeded" and job["result"]["images"] == sync.json()["images"]
        preferred = client.post("/v1/generate", json=body, headers={"Prefer": "respond-async"})
        assert preferred.status_code == 202
        assert client.get("/v1/jobs/job-" + "0" * 24).status_code == 404
    deadline = time.monotonic() + 10
    while not receiver.received and time.monotonic() < deadline:
        time.sleep(0.1)
    headers, payload = receiver.received[0]
    assert verify_signature(SECRET, headers, payload)
    assert json.loads(payload)["event"] == "generation.succeeded" and SECRET.encode() not in payload
    app2, _ = _app(registry, tmp_path)  # another gateway: results live in storage
    with TestClient(app2) as client:
        assert client.get(f"/v1/jobs/{job_id}").json()["state"] == "succeeded"


def test_async_jobs_may_ask_for_more_images_and_expire(registry, tmp_path):
    app, _ = _app(registry, tmp_path, async_jobs={"retention_s": 1.0, "max_num_images": 6})
    body = {"prompt": PROMPT, "steps": 1, "seed": 1, "num_images": 6}
    with TestClient(app) as client:
        assert client.post("/v1/generate", json=body).status_code == 422  # sync: limits.max_num_images (4)
        accepted = client.post("/v1/jobs", json=body)
        assert accepted.status_code == 202, accepted.text
        job = _wait_job(client, accepted.json()["id"])
        assert len(job["result"]["images"]) == 6
        assert client.post("/v1/jobs", json={**body, "num_images": 7}).status_code == 422
        time.sleep(1.2)
        assert client.get(f"/v1/jobs/{job['id']}").status_code == 404
        failed = _wait_job(client, client.post("/v1/jobs", json={**body, "adapter": "nothing"}).json()["id"])
        assert failed["state"] == "failed" and failed["error"]["code"] == "adapter_not_found"


def test_prewarmed_adapters_are_resident_before_the_first_request(registry, tmp_path):
    app, service = _app(registry, tmp_path, prewarm=["look1:prod", "missing-adapter"])
    replica = service.backend.replica
    assert replica.health()["prewarmed"] == ["look1@1"]  # a bad ref is logged, not fatal
    digest = registry.resolve("look1:prod").digest
    assert digest in replica.resident()[Tier.host].digests
    assert digest in replica.engine.routed.cache.keys()  # the warm-up pass left its device copy
    with TestClient(app) as client:
        first = client.post("/v1/generate", json={"prompt": PROMPT, "adapter": "look1:prod", "steps": 1})
        assert first.json()["timings"]["adapter_load_ms"] < 50


def test_a_pinned_version_survives_eviction_within_its_budget(registry, tmp_path):
    size = registry.resolve("look0:prod").size
    app, service = _app(registry, tmp_path, cache={"host_bytes": 2 * size + 100, "pinned_bytes": size + 10,
                                                   "pin_refresh_s": 0.1})
    replica = service.backend.replica
    with TestClient(app) as client:
        pinned = client.put("/v1/adapters/look0/pin", json={})
        assert pinned.status_code == 200 and pinned.json()["version"] == 1
        assert client.put("/v1/adapters/look1/pin", json={"version": 1}).status_code == 409  # over pinned_bytes
        assert client.get("/v1/adapters/look0").json()["pinned_version"] == 1
        deadline = time.monotonic() + 5
        while registry.resolve("look0:prod").digest not in replica.fetcher.host.held and time.monotonic() < deadline:
            time.sleep(0.05)
        for name in ("look1", "look2", "look3", "look1", "look2"):  # more than the host tier holds
            assert client.post("/v1/generate", json={"prompt": PROMPT, "adapter": f"{name}:prod",
                                                     "steps": 1}).status_code == 200
        host = replica.resident()[Tier.host].digests
        assert registry.resolve("look0:prod").digest in host and len(host) <= 2
        assert client.delete("/v1/adapters/look0/pin").status_code == 204
        assert client.delete("/v1/adapters/look0/pin").status_code == 404
        assert client.get("/v1/adapters/look0").json()["pinned_version"] is None
