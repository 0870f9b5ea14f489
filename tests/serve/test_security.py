"""The HTTP door: auth before the body, body limits, auth that never fails open, and what open
routes show. In-process app for the routing rules, a live server (real sockets) for memory."""

from __future__ import annotations

import socket
import threading

import httpx
import pytest
from fastapi.testclient import TestClient

from lorafleet.serve.app import create_local_app
from lorafleet.serve.errors import RequestInvalid
from lorafleet.serve.settings import ServeSettings, load_settings

GEN = "gen-token-0123456789abcdef0123456789"
ADMIN = "admin-token-0123456789abcdef0123456789"
SCRAPER = "scraper-token-0123456789abcdef012345"
TOKENS = f"{GEN}=generate,{ADMIN}=admin,{SCRAPER}=metrics"


def _bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def secured(adapter_registry, tmp_path_factory):
    settings = ServeSettings(base="tiny", registry=adapter_registry.uri, api_tokens=TOKENS,
                             cache={"disk_dir": str(tmp_path_factory.mktemp("sec") / "cache")})
    app, _ = create_local_app(settings, adapter_registry)
    with TestClient(app) as client:
        yield client


def test_tokens_alone_turn_auth_on(secured):
    """auth_enabled was not set: configured tokens are enough (auth never fails open)."""
    assert secured.post("/v1/generate", json={"prompt": "a red circle"}).status_code == 401
    assert secured.get("/v1/adapters").status_code == 401
    assert secured.get("/v1/adapters", headers=_bearer(GEN)).status_code == 200


def test_anonymous_callers_get_status_only(secured):
    assert secured.get("/healthz").json() == {"status": "ok"}
    assert secured.get("/readyz").json() == {"status": "ready"}
    detailed = secured.get("/readyz", headers=_bearer(ADMIN)).json()
    assert detailed["registry"] and detailed["base_fingerprint"]


@pytest.mark.parametrize("path, allowed", [
    ("/metrics", {SCRAPER, ADMIN}),
    ("/openapi.json", {GEN, ADMIN}),
])
def test_schema_and_metrics_need_a_scope(secured, path, allowed):
    assert secured.get(path).status_code == 401
    for token in (GEN, ADMIN, SCRAPER):
        assert secured.get(path, headers=_bearer(token)).status_code == (200 if token in allowed else 403)


def test_no_docs_pages_that_load_scripts_from_a_cdn(secured):
    for path in ("/docs", "/redoc"):
        assert secured.get(path, headers=_bearer(ADMIN)).status_code == 404


def test_replica_identity_only_for_admins(secured):
    body = {"prompt": "a red circle", "steps": 1, "seed": 0}
    assert secured.post("/v1/generate", json=body, headers=_bearer(GEN)).json()["replica"] is None
    generated = {**body, "cache": False}  # a repeat would come from the output cache: no replica made it
    assert ":" in secured.post("/v1/generate", json=generated, headers=_bearer(ADMIN)).json()["replica"]


def test_a_body_over_the_limit_is_413_before_parsing(secured):
    big = b'{"prompt": "' + b"x" * (70 * 1024) + b'"}'
    response = secured.post("/v1/generate", content=big, headers={**_bearer(GEN), "content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["field"] == "body"

    def chunks():  # no Content-Length: the streamed bytes are counted
        for _ in range(70):
            yield b"x" * 1024

    response = secured.post("/v1/generate", content=chunks(), headers={**_bearer(GEN), "content-type": "application/json"})
    assert response.status_code == 413


@pytest.mark.parametrize("overrides, field", [
    ({"api_tokens": "short-token=admin"}, "api_tokens"),
    ({"api_tokens": "REPLACE_ME-REPLACE_ME-REPLACE_ME-REPLACE_ME=admin"}, "api_tokens"),
    ({"host": "0.0.0.0"}, "host"),
    ({"limits": {"default_steps": 30, "max_steps": 3}}, "limits.default_steps"),
    ({"limits": {"min_size": 512, "max_size": 256}}, "limits.min_size"),
    ({"limits": {"default_guidance_scale": 80}}, "limits.default_guidance_scale"),
    ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "autoscaling.min_replicas"),
])
def test_unsafe_or_inconsistent_settings_are_refused_at_start_up(overrides, field):
    with pytest.raises(RequestInvalid) as caught:
        load_settings(**overrides)
    assert caught.value.field == field, caught.value
    if field.startswith("limits.default_steps"):
        assert "limits.max_steps" in str(caught.value)  # both keys named


def test_non_loopback_without_auth_needs_the_explicit_flag():
    settings = load_settings(host="0.0.0.0", insecure_no_auth=True)
    assert not settings.auth_required
    assert load_settings(host="0.0.0.0", api_tokens=TOKENS).auth_required
    assert not load_settings(host="127.0.0.1").auth_required


def test_serve_cli_refuses_a_public_address_without_auth(capsys):
    from lorafleet.cli import main

    assert main(["serve", "--no-ray", "--host", "0.0.0.0", "--base", "tiny"]) == 1
    err = capsys.readouterr().err
    assert "--insecure-no-auth" in err and "Traceback" not in err


def _send_unauthenticated_body(url: str, megabytes: int) -> int:
    """POST a big body by hand (as an attacker would) and return the status the server answered."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        head = (f"POST /v1/generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {megabytes * 2**20}\r\n\r\n").encode()
        sock.sendall(head)
        try:
            chunk = b"x" * 2**20
            for _ in range(megabytes):
                sock.sendall(chunk)
        except OSError:
            pass  # the server answered and closed before the body ended: what we want
        reply = sock.recv(4096).decode(errors="replace")
    return int(reply.split(" ", 2)[1])


@pytest.mark.slow
def test_unauthenticated_30mb_bodies_do_not_grow_server_memory(adapter_registry, tmp_path):
    from lorafleet.devtools.live_server import start_live_server

    with start_live_server(tmp_path / "srv", base="tiny", registry=adapter_registry.uri, api_tokens=TOKENS,
                           cache={"disk_dir": str(tmp_path / "cache")}) as server:
        before = server.rss_mb()
        statuses = []
        threads = [threading.Thread(target=lambda: statuses.append(_send_unauthenticated_body(server.url, 30)))
                   for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        after = server.rss_mb()
        assert statuses == [401] * 4
        assert after - before < 40, f"RSS grew from {before:.0f} to {after:.0f} MB"
        authorized = httpx.post(f"{server.url}/v1/generate", content=b"x" * 2**20, headers=_bearer(GEN), timeout=60)
        assert authorized.status_code == 413


def test_the_server_revalidates_stored_bytes_before_injecting_them(tiny_spec, tmp_path):
    """A version whose blob was swapped in storage (digest updated too) is refused, not injected."""
    from test_adapter_cache import _forged

    from lorafleet.registry import AdapterRegistry

    registry = AdapterRegistry(f"file://{tmp_path / 'reg'}")
    _forged(registry, tiny_spec, tmp_path)
    settings = ServeSettings(base="tiny", registry=registry.uri, cache={"disk_dir": str(tmp_path / "cache")})
    app, _ = create_local_app(settings, registry)
    with TestClient(app) as client:
        response = client.post("/v1/generate", json={"prompt": "a red circle", "steps": 1, "adapter": "forged@1"})
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "adapter_incompatible"
        assert client.post("/v1/generate", json={"prompt": "a red circle", "steps": 1}).status_code == 200


def test_one_poisoned_manifest_does_not_break_the_adapter_listing(tiny_spec, tmp_path):
    """A NaN-alpha manifest once made GET /v1/adapters a 502 for everyone; now it is skipped."""
    import json

    from helpers import publish_lora

    from lorafleet.registry import AdapterRegistry
    from lorafleet.registry.adapter_registry import manifest_key

    registry = AdapterRegistry(f"file://{tmp_path / 'reg'}")
    publish_lora(registry, tiny_spec, tmp_path, name="good")
    publish_lora(registry, tiny_spec, tmp_path, name="poisoned", seed=1)
    key = manifest_key("poisoned", 1)
    raw = json.loads(registry.store.read(key).data)
    raw["alpha"] = None
    registry.store.delete(key)
    registry.store.create(key, json.dumps(raw).replace("null", "NaN", 1).encode())
    settings = ServeSettings(base="tiny", registry=registry.uri, cache={"disk_dir": str(tmp_path / "cache")})
    app, _ = create_local_app(settings, registry)
    with TestClient(app) as client:
        response = client.get("/v1/adapters")
        assert response.status_code == 200, response.text
        assert [a["name"] for a in response.json()] == ["good"]
