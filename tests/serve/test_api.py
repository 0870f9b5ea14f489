"""The HTTP API in-process (FastAPI app + a real in-process replica, no Ray)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import shutil
import subprocess
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from serve_setup import GUIDANCE, PROMPT, STEPS, plain_diffusers_image

from lorafleet.registry import PublishRequest
from lorafleet.serve.app import create_local_app
from lorafleet.serve.service import decode_npy
from lorafleet.serve.settings import ServeSettings

TOKENS = "gen-token-0123456789abcdef0123456789=generate,admin-token-0123456789abcdef0123456789=admin"


def _settings(registry, tmp_path, **overrides) -> ServeSettings:
    return ServeSettings(base="tiny", registry=registry.uri, cache={"disk_dir": str(tmp_path / "cache")}, **overrides)


@pytest.fixture(scope="module")
def client(adapter_registry, tmp_path_factory):
    app, _ = create_local_app(_settings(adapter_registry, tmp_path_factory.mktemp("api"), resolution_ttl_s=0),
                              adapter_registry)
    with TestClient(app) as test_client:
        yield test_client


def _body(**fields):
    return {"prompt": PROMPT, "steps": STEPS, "guidance_scale": GUIDANCE, "seed": 0, **fields}


_npy = decode_npy


def test_generate_returns_png_images_resolved_adapters_and_timings(client, adapter_registry):
    response = client.post("/v1/generate", json=_body(adapter="style1:prod", num_images=2))
    assert response.status_code == 200, response.text
    body = response.json()
    manifest = adapter_registry.resolve("style1:prod")
    assert body["adapters"] == [{"ref": "style1:prod", "name": "style1", "version": 1, "digest": manifest.digest,
                                 "weight": 1.0}]
    assert body["seeds"] == [0, 1] and len(body["images"]) == 2
    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert image.format == "PNG" and image.size == (32, 32)
    assert set(body["timings"]) == {"queue_ms", "adapter_load_ms", "generation_ms", "total_ms", "batch_images",
                                    "adapter_mode", "cut_in", "breakdown"}
    assert body["timings"]["cut_in"] is False  # no tenants: nothing cuts in
    stages = body["timings"]["breakdown"]
    assert set(stages) == {"checks", "resolve", "output_cache", "backend", "encode", "replica", "replica_wait"}
    assert stages["replica"] <= stages["backend"] and sum(v for k, v in stages.items()
                                                         if not k.startswith("replica")) <= body["timings"]["total_ms"]
    assert body["timings"]["batch_images"] == 2 and body["timings"]["adapter_mode"] in ("mixed", "active")


@pytest.mark.parametrize("output_format, pil_format", [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_other_image_formats(client, output_format, pil_format):
    body = client.post("/v1/generate", json=_body(output_format=output_format)).json()
    assert Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).format == pil_format


def test_served_image_equals_plain_diffusers_with_the_adapter_file(client, pulled_files):
    body = client.post("/v1/generate", json=_body(adapter="style2", output_format="npy")).json()
    expected = plain_diffusers_image(pulled_files["style2"])
    assert np.abs(_npy(body["images"][0]) - expected).max() <= 1e-4


BAD_REQUESTS = [
    (_body(adapter="missing-adapter"), 404, "adapter"),
    (_body(adapter="style1@99"), 404, "adapter"),
    (_body(adapters=[{"ref": "style1"}, {"ref": "style1:nope"}]), 404, "adapters[1].ref"),
    (_body(adapter="Bad Name"), 422, "adapter"),
    (_body(adapter="../../etc/passwd"), 422, "adapter"),
    (_body(steps=500), 422, "steps"),
    (_body(steps=0), 422, "steps"),
    (_body(width=33), 422, "width"),
    (_body(height=4096), 422, "height"),
    (_body(num_images=50), 422, "num_images"),
    (_body(prompt="x" * 5000), 422, "prompt"),
    (_body(prompt="x" * 1_000_000), 413, "body"),  # over max_body_bytes: refused before parsing
    (_body(prompt="   "), 422, "prompt"),
    (_body(negative_prompt="y" * 5000), 422, "negative_prompt"),
    (_body(seed=-1), 422, "seed"),
    (_body(seed=2**40), 422, "seed"),
    (_body(guidance_scale=1e9), 422, "guidance_scale"),
    (_body(adapter="style1", adapters=[{"ref": "style2"}]), 422, "body"),
    (_body(adapters=[{"ref": f"style{i}"} for i in range(5)]), 422, "adapters"),
    (_body(adapters=[{"ref": "style1", "weight": 100}]), 422, "adapters[0].weight"),
    (_body(output_format="gif"), 422, "output_format"),
    (_body(unexpected="field"), 422, "unexpected"),
    ({"steps": 4}, 422, "prompt"),
]


@pytest.mark.parametrize("body, status, field", BAD_REQUESTS)
def test_bad_requests_get_json_errors_naming_the_field(client, body, status, field):
    response = client.post("/v1/generate", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field and error["message"] and error["code"]


def test_one_adapter_named_twice_adds_its_weights(client):
    twice = client.post("/v1/generate", json=_body(output_format="npy", adapters=[
        {"ref": "style1", "weight": 0.5}, {"ref": "style1@1", "weight": 0.5}]))
    once = client.post("/v1/generate", json=_body(output_format="npy", adapter="style1"))
    assert twice.status_code == once.status_code == 200, twice.text
    assert [(a["ref"], a["weight"]) for a in twice.json()["adapters"]] == [("style1", 1.0)]
    assert np.array_equal(_npy(twice.json()["images"][0]), _npy(once.json()["images"][0]))


@pytest.mark.parametrize("raw", [b"\xff\xfe\x00garbage", b'{"prompt": "a", "guidance_scale": NaN}', b"[1, 2",
                                 b'{"prompt": "a", "steps": 1e400}'])
def test_undecodable_bodies_are_422_not_500(client, raw):
    response = client.post("/v1/generate", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert "error" in response.json()


def test_adapter_for_another_base_is_422(client, adapter_registry, tiny_spec, tmp_path):
    from helpers import write_lora

    other_base = dataclasses.replace(tiny_spec, id="other", fingerprint="sha256:" + "cd" * 32)
    adapter_registry.publish(write_lora(tmp_path, tiny_spec, seed=77), PublishRequest(name="foreign", base=other_base))
    response = client.post("/v1/generate", json=_body(adapter="foreign"))
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "adapter_incompatible"


def test_alias_moves_take_effect_on_the_next_request(client, adapter_registry, tiny_spec, tmp_path):
    from helpers import write_lora

    adapter_registry.publish(write_lora(tmp_path, tiny_spec, seed=5), PublishRequest(name="moving", base=tiny_spec,
                                                                                     aliases=["prod"]))
    second = adapter_registry.publish(write_lora(tmp_path, tiny_spec, seed=6),
                                      PublishRequest(name="moving", base=tiny_spec))
    assert client.post("/v1/generate", json=_body(adapter="moving:prod")).json()["adapters"][0]["version"] == 1
    adapter_registry.set_alias("moving", "prod", 2)
    moved = client.post("/v1/generate", json=_body(adapter="moving:prod")).json()["adapters"][0]
    assert moved["version"] == 2 and moved["digest"] == second.digest


def test_textual_inversion_adapter_through_the_api(client, pulled_files):
    body = client.post("/v1/generate", json=_body(prompt="a photo of <sks>", adapter="sks-token",
                                                  output_format="npy")).json()
    expected = plain_diffusers_image(None, prompt="a photo of <sks>", textual_inversion=pulled_files["sks-token"])
    assert np.abs(_npy(body["images"][0]) - expected).max() <= 1e-4


def test_adapter_listing_shows_registry_and_cache(client):
    client.post("/v1/generate", json=_body(adapter="style3"))
    listing = {a["name"]: a for a in client.get("/v1/adapters").json()}
    assert {"style0", "style3", "sks-token"} <= set(listing)
    assert "host" in listing["style3"]["cached"]
    one = client.get("/v1/adapters/style3").json()
    assert one["aliases"] == {"prod": 1} and one["latest_version"] == 1
    assert client.get("/v1/adapters/nothing").status_code == 404


def test_health_readiness_and_openapi(client):
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["base"] == "tiny" and ready["mode"] == "registry"
    schema = client.get("/openapi.json").json()
    assert {"/v1/generate", "/v1/images/generations", "/v1/adapters", "/readyz"} <= set(schema["paths"])


def test_metrics_pass_promtool(client):
    client.post("/v1/generate", json=_body(adapter="style1"))
    text = client.get("/metrics").text
    for name in ("lorafleet_requests_total", "lorafleet_request_duration_seconds_bucket", "lorafleet_queue_depth",
                 "lorafleet_adapter_loads_total", "lorafleet_cache_hits_total", "lorafleet_resident_adapters",
                 "lorafleet_generation_duration_seconds_bucket"):
        assert name in text
    promtool = shutil.which("promtool")
    assert promtool, "promtool is installed by scripts/setup.sh (Debian package prometheus)"
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _requests_counted(client) -> dict[tuple[str, str], float]:
    counted = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "lorafleet_requests_total":
                counted[sample.labels["route"], sample.labels["status"]] = sample.value
    return counted


def test_every_request_is_counted_by_its_route_and_status(client):
    before = _requests_counted(client)
    client.post("/v1/generate", json=_body())
    client.post("/v1/generate", json={**_body(), "steps": -1})
    client.get("/v1/no-such-route")
    after = _requests_counted(client)
    for key in (("/v1/generate", "200"), ("/v1/generate", "422"), ("unmatched", "404")):
        assert after.get(key, 0) - before.get(key, 0) == 1, key


class TestAuth:
    @pytest.fixture(scope="class")
    def secured(self, adapter_registry, tmp_path_factory):
        settings = _settings(adapter_registry, tmp_path_factory.mktemp("auth"), auth_enabled=True, api_tokens=TOKENS)
        app, _ = create_local_app(settings, adapter_registry)
        with TestClient(app) as test_client:
            yield test_client

    ROUTES = [("post", "/v1/generate", _body(), "generate"),
              ("post", "/v1/images/generations", {"prompt": "x", "size": "32x32"}, "generate"),
              ("get", "/v1/adapters", None, "generate"),
              ("get", "/v1/adapters/style1", None, "generate"),
              ("put", "/v1/adapters/style1/aliases/canary", {"version": 1}, "admin")]

    @pytest.mark.parametrize("method, path, body, scope", ROUTES)
    def test_every_route_checks_its_scope(self, secured, method, path, body, scope):
        def call(token):
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            return secured.request(method, path, json=body, headers=headers)

        assert call(None).status_code == 401
        assert call("wrong-token").status_code == 401
        assert call("gen-token-0123456789abcdef0123456789").status_code == (200 if scope == "generate" else 403)
        assert call("admin-token-0123456789abcdef0123456789").status_code == 200

    def test_health_stays_open_and_metrics_need_a_token(self, secured):
        assert secured.get("/healthz").status_code == 200 and secured.get("/readyz").status_code == 200
        assert secured.get("/metrics").status_code == 401
        assert secured.get("/metrics", headers={"Authorization": "Bearer admin-token-0123456789abcdef0123456789"}
                           ).status_code == 200


def test_overload_answers_503_with_retry_after_quickly(adapter_registry, tmp_path):
    settings = _settings(adapter_registry, tmp_path, max_ongoing_requests=1, max_queued_requests=1)
    app, _ = create_local_app(settings, adapter_registry)

    async def burst():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as ac:
            await ac.get("/readyz")

            async def one(seed: int):  # distinct requests: identical ones would share one generation
                started = time.perf_counter()
                response = await ac.post("/v1/generate", json=_body(steps=30, seed=seed))
                return response, time.perf_counter() - started

            return await asyncio.gather(*[one(seed) for seed in range(8)])

    results = asyncio.run(burst())
    statuses = [r.status_code for r, _ in results]
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    for response, seconds in results:
        if response.status_code == 503:
            assert response.headers["Retry-After"] == "1" and seconds < 1.0
            assert response.json()["error"]["code"] == "overloaded"


def test_official_openai_client_against_a_live_server(adapter_registry, tmp_path):
    import openai
    import uvicorn

    from lorafleet.local_cluster import free_port

    app, _ = create_local_app(_settings(adapter_registry, tmp_path), adapter_registry)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        result = client.images.generate(model="style1:prod", prompt=PROMPT, n=2, size="32x32",
                                        response_format="b64_json")
        assert len(result.data) == 2
        assert Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).size == (32, 32)
        base = client.images.generate(model="base", prompt=PROMPT, size="32x32")
        assert base.data[0].b64_json
        with pytest.raises(openai.NotFoundError):
            client.images.generate(model="missing", prompt=PROMPT, size="32x32")
        with pytest.raises(openai.UnprocessableEntityError):
            client.images.generate(model="base", prompt=PROMPT, size="33x32")
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_wrong_method_answers_405_with_allow(client):
    response = client.request("DELETE", "/v1/generate")
    assert response.status_code == 405 and "POST" in response.headers["Allow"]
    assert response.json()["error"]["code"] == "http_error"


def test_a_corrupted_blob_is_never_served_and_is_counted(adapter_registry, tiny_spec, tmp_path):
    from helpers import write_lora

    from lorafleet.registry.adapter_registry import blob_key

    manifest = adapter_registry.publish(write_lora(tmp_path, tiny_spec, seed=91),
                                        PublishRequest(name="to-corrupt", base=tiny_spec))
    path = adapter_registry.store.root / blob_key(manifest.digest)
    path.write_bytes(path.read_bytes()[:-1] + b"\x01")
    app, service = create_local_app(_settings(adapter_registry, tmp_path), adapter_registry)
    with TestClient(app) as fresh:
        response = fresh.post("/v1/generate", json=_body(adapter="to-corrupt"))
        assert response.status_code == 502 and response.json()["error"]["code"] == "integrity_error"
        metrics = fresh.get("/metrics").text
    assert 'lorafleet_adapter_load_failures_total{code="integrity_error"} 1.0' in metrics


def test_a_bug_behind_the_api_is_a_json_500_and_the_server_answers_on(adapter_registry, tmp_path, monkeypatch):
    app, service = create_local_app(_settings(adapter_registry, tmp_path), adapter_registry)

    async def broken(task):  # a fault injected into the replica: a bug, not a platform failure
        raise ZeroDivisionError("injected")

    monkeypatch.setattr(service.backend.replica, "generate_async", broken)
    with TestClient(app, raise_server_exceptions=False) as fresh:
        response = fresh.post("/v1/generate", json=_body())
        assert response.status_code == 500
        assert response.json()["error"]["code"] == "internal_error"
        assert "Retry-After" not in response.headers
        assert fresh.get("/healthz").status_code == 200


def test_what_the_gateway_and_the_replica_hold_in_memory_is_answered_without_a_thread_hop(
        adapter_registry, tmp_path, monkeypatch):
    """Under load a hop to a worker thread waits for the GIL beside the pass (about 3 ms a request
    through HTTP): a reference the gateway has resolved and an adapter the replica holds are
    answered on the event loop; the registry and the adapter store are read in a thread."""
    import asyncio

    hops: list[str] = []
    to_thread = asyncio.to_thread

    def counted(fn, *args, **kwargs):
        hops.append(fn.__name__)
        return to_thread(fn, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counted)
    app, _ = create_local_app(_settings(adapter_registry, tmp_path, resolution_ttl_s=60,
                                        output_cache={"enabled": False}), adapter_registry)
    with TestClient(app) as client:
        hops_per_request = []
        for seed, ref in enumerate(("style2@1", "style2@1", "style2:prod", "style2:prod")):
            hops.clear()
            assert client.post("/v1/generate", json=_body(adapter=ref, seed=seed)).status_code == 200
            hops_per_request.append(sorted(hops))
    # style2@1: resolved and fetched in threads, then neither; the alias: resolved once, style2 held
    assert hops_per_request == [["_fetch", "_resolve"], [], ["_resolve"], []]
