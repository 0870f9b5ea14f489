"""Tenants through the HTTP API (in-process app, a real replica): each sees and uses only its own
namespaces (another's adapter is a 404, as if it did not exist), its rate limits answer 429 with
Retry-After, its usage is metered, outputs are never shared across tenants, and the fair queue
serves a quiet tenant before a noisy one's backlog."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from helpers import metric_samples, publish_lora, wait_until_in_flight
from serve_setup import PROMPT

from lorafleet.serve.app import create_local_app
from lorafleet.serve.errors import RequestInvalid
from lorafleet.serve.settings import ServeSettings, load_settings
from lorafleet.serve.tenants import FairAdmission, RateLimited

ACME, GLOBEX = "acme-token-0123456789abcdef0123456789", "globex-token-0123456789abcdef012345678"
ACME_ADMIN, OPERATOR = "acme-admin-0123456789abcdef0123456789", "operator-admin-0123456789abcdef012345"
INITECH, INITECH_ADMIN = "initech-token-0123456789abcdef01234567", "initech-admin-0123456789abcdef0123456"
HOOLI, UMBRELLA = "hooli-token-0123456789abcdef0123456789", "umbrella-token-0123456789abcdef01234567"
TOKENS = (f"{ACME}=generate+train@acme,{GLOBEX}=generate@globex,{ACME_ADMIN}=admin@acme,{OPERATOR}=admin,"
          f"{INITECH}=generate@initech,{INITECH_ADMIN}=admin@initech,{HOOLI}=generate@hooli,"
          f"{UMBRELLA}=generate@umbrella")
TENANTS = {"acme": {"namespaces": ["acme-"], "requests_per_s": 0.5, "request_burst": 6},
           "globex": {"namespaces": ["globex-"], "work_per_s": 0.01, "work_burst": 0.05},
           "initech": {"namespaces": ["initech-"]},  # only the usage test sends as initech
           "hooli": {"namespaces": ["hooli-"]}, "umbrella": {"namespaces": ["umbrella-"]}}  # the cut-in test


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_spec):
    from lorafleet.registry import AdapterRegistry

    root = tmp_path_factory.mktemp("tenants")
    registry = AdapterRegistry(f"file://{root / 'registry'}")
    for name in ("acme-style", "globex-style", "shared-style"):
        publish_lora(registry, tiny_spec, root, name=name, aliases=["prod"])
    settings = ServeSettings(base="tiny", registry=registry.uri, api_tokens=TOKENS, tenants=TENANTS,
                             cache={"disk_dir": str(root / "cache")},
                             trainings={"ray_address": "http://127.0.0.1:9"})
    app, _ = create_local_app(settings, registry)
    with TestClient(app) as test_client:
        yield test_client


def _as(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def _generate(client, token, adapter=None, **fields):
    body = {"prompt": PROMPT, "steps": 2, "seed": 1, **({"adapter": adapter} if adapter else {}), **fields}
    return client.post("/v1/generate", json=body, headers=_as(token))


def test_a_tenant_sees_and_uses_only_its_namespaces(client):
    assert _generate(client, ACME, "acme-style:prod").status_code == 200
    foreign, missing = _generate(client, ACME, "globex-style:prod"), _generate(client, ACME, "acme-nothing")
    assert foreign.status_code == missing.status_code == 404
    assert foreign.json()["error"]["code"] == missing.json()["error"]["code"] == "adapter_not_found"
    assert foreign.json()["error"]["field"] == "adapter"
    listed = {a["name"] for a in client.get("/v1/adapters", headers=_as(ACME)).json()}
    assert listed == {"acme-style"}
    assert client.get("/v1/adapters/globex-style", headers=_as(ACME)).status_code == 404
    assert client.get("/v1/adapters/acme-style", headers=_as(ACME)).status_code == 200
    openai = client.post("/v1/images/generations", json={"prompt": PROMPT, "model": "globex-style", "size": "32x32"},
                         headers=_as(ACME))
    assert openai.status_code == 404
    everything = {a["name"] for a in client.get("/v1/adapters", headers=_as(OPERATOR)).json()}
    assert everything == {"acme-style", "globex-style", "shared-style"}


def test_alias_moves_stay_inside_the_namespace(client):
    own = client.put("/v1/adapters/acme-style/aliases/canary", json={"version": 1}, headers=_as(ACME_ADMIN))
    other = client.put("/v1/adapters/globex-style/aliases/canary", json={"version": 1}, headers=_as(ACME_ADMIN))
    assert own.status_code == 200 and other.status_code == 404
    assert client.put("/v1/adapters/globex-style/aliases/canary", json={"version": 1},
                      headers=_as(OPERATOR)).status_code == 200


def test_outputs_are_never_shared_across_tenants(client):
    first = _generate(client, OPERATOR, seed=77)
    again = _generate(client, OPERATOR, seed=77)
    other_tenant = _generate(client, ACME, seed=77)
    assert (first.headers["X-Cache"], again.headers["X-Cache"], other_tenant.headers["X-Cache"]) == \
        ("miss", "hit", "miss")
    assert other_tenant.json()["images"] == first.json()["images"]  # the same bytes, generated again


def test_request_and_work_rates_answer_429_with_retry_after(client):
    statuses = [_generate(client, ACME, seed=i, cache=False) for i in range(8)]
    limited = [r for r in statuses if r.status_code == 429]
    assert limited and all(r.status_code == 200 for r in statuses[:len(statuses) - len(limited)])
    assert limited[0].json()["error"]["code"] == "rate_limited" and int(limited[0].headers["Retry-After"]) >= 1
    heavy = _generate(client, GLOBEX, num_images=2, steps=20, cache=False)  # 2 x 20 x 0.001 MP = 0.04
    over = _generate(client, GLOBEX, num_images=2, steps=20, cache=False)
    assert heavy.status_code == 200 and over.status_code == 429
    assert "image-steps-megapixels" in over.json()["error"]["message"]
    samples = metric_samples(client.get("/metrics", headers=_as(OPERATOR)).text)
    assert samples[('lorafleet_rate_limited_total', (('tenant', 'acme'),))] >= len(limited)
    assert samples[('lorafleet_rate_limited_total', (('tenant', 'globex'),))] >= 1


def test_usage_is_metered_per_tenant_and_in_prometheus(client):
    for seed in (5, 6):
        assert _generate(client, INITECH, seed=seed, cache=False).status_code == 200
    usage = {u["tenant"]: u for u in client.get("/v1/usage", headers=_as(OPERATOR)).json()}
    assert usage["initech"]["requests"] == 2 and usage["initech"]["images"] == 2
    assert usage["initech"]["steps_megapixels"] > 0 and usage["initech"]["replica_seconds"] > 0
    own = client.get("/v1/usage", headers=_as(INITECH_ADMIN)).json()
    assert [u["tenant"] for u in own] == ["initech"]
    assert client.get("/v1/usage", params={"tenant": "acme"}, headers=_as(INITECH_ADMIN)).json() == []
    assert client.get("/v1/usage", headers=_as(INITECH)).status_code == 403
    samples = metric_samples(client.get("/metrics", headers=_as(OPERATOR)).text)
    assert samples[('lorafleet_tenant_requests_total', (('tenant', 'initech'),))] == 2
    assert samples[('lorafleet_tenant_images_total', (('tenant', 'initech'),))] == 2


def test_a_quiet_tenant_cuts_into_a_busy_tenants_pass(client):
    """Hooli fills the replica with one long pass; umbrella's request, sent while it runs, runs
    between two of its steps (serve/batching.py) and is answered before that pass ends."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        flood = [pool.submit(_generate, client, HOOLI, seed=seed, steps=40, cache=False) for seed in range(8)]
        wait_until_in_flight(lambda: client.get("/metrics", headers=_as(OPERATOR)).text, flood)
        time.sleep(0.2)  # the flood's pass is under way
        quiet = _generate(client, UMBRELLA, seed=1, steps=2, cache=False)
        flooded = [future.result() for future in flood]
    assert quiet.status_code == 200 and all(r.status_code == 200 for r in flooded)
    timings = quiet.json()["timings"]
    assert timings["cut_in"] and timings["batch_images"] == 1
    longest = max(r.json()["timings"]["generation_ms"] for r in flooded)
    assert timings["total_ms"] < longest  # answered within the pass it cut into
    assert not any(r.json()["timings"]["cut_in"] for r in flooded)
    samples = metric_samples(client.get("/metrics", headers=_as(OPERATOR)).text)
    assert samples[("lorafleet_cut_in_requests_total", ())] >= 1


def test_trainings_belong_to_their_tenant(client):
    digest = "sha256:" + "0" * 64
    outside = client.post("/v1/trainings", json={"config": {"data": {}}, "dataset": digest,
                                                  "publish": {"name": "globex-x"}}, headers=_as(ACME))
    assert outside.status_code == 422 and outside.json()["error"]["field"] == "publish.name"
    assert client.get("/v1/trainings", headers=_as(ACME)).json() == []


def test_tokens_must_name_configured_tenants():
    with pytest.raises(RequestInvalid, match="not configured"):
        load_settings(api_tokens=f"{ACME}=generate@nobody")


def test_the_fair_queue_serves_a_quiet_tenant_before_a_noisy_backlog():
    async def scenario() -> list[str]:
        fair, order = FairAdmission(capacity=2), []

        async def request(tenant: str, hold: asyncio.Event):
            await fair.acquire(tenant, 1.0, None)
            order.append(tenant)
            await hold.wait()
            fair.release(tenant)

        holds = [asyncio.Event() for _ in range(12)]
        tasks = [asyncio.create_task(request("noisy", holds[i])) for i in range(10)]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(request("quiet", holds[10])))
        await asyncio.sleep(0)
        for hold in holds[:3]:  # three of the noisy tenant's requests finish
            hold.set()
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        for hold in holds:
            hold.set()
        await asyncio.gather(*tasks)
        return order

    order = asyncio.run(scenario())
    assert order[:2] == ["noisy", "noisy"] and order[2] == "quiet"  # the first freed place


def test_a_full_tenant_lane_is_429_not_a_crash():
    async def scenario():
        fair = FairAdmission(capacity=1)
        await fair.acquire("a", 1.0, 1)
        waiting = asyncio.create_task(fair.acquire("a", 1.0, 1))
        await asyncio.sleep(0)
        with pytest.raises(RateLimited):
            await fair.acquire("a", 1.0, 1)
        fair.release("a")
        await waiting

    asyncio.run(scenario())
