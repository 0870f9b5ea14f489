"""Usage metering survives its gateway: minute buckets are flushed to the registry's storage, so a
restarted gateway, or any of several, answers GET /v1/usage with everything every gateway served.

Through the HTTP API (in-process apps, real replicas) on one file registry, and the ledger itself
on the same store for retention, damaged objects and a store that fails.
"""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient
from helpers import publish_lora
from serve_setup import PROMPT

from lorafleet.registry.storage import open_store
from lorafleet.serve.app import create_local_app
from lorafleet.serve.settings import ServeSettings
from lorafleet.serve.usage import MINUTE, UsageLedger

ACME, OPERATOR = "acme-token-0123456789abcdef0123456789", "operator-admin-0123456789abcdef012345"
TOKENS = f"{ACME}=generate@acme,{OPERATOR}=admin"


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_spec):
    from lorafleet.registry import AdapterRegistry

    root = tmp_path_factory.mktemp("usage")
    registry = AdapterRegistry(f"file://{root / 'registry'}")
    publish_lora(registry, tiny_spec, root, name="acme-style", aliases=["prod"])
    return registry


def _app(registry, tmp_path):
    settings = ServeSettings(base="tiny", registry=registry.uri, api_tokens=TOKENS,
                             tenants={"acme": {"namespaces": ["acme-"]}}, cache={"disk_dir": str(tmp_path / "cache")},
                             output_cache={"enabled": False}, usage={"flush_s": 0.2})
    return create_local_app(settings, registry)[0]


def _generate(client, seed):
    response = client.post("/v1/generate", json={"prompt": PROMPT, "steps": 1, "seed": seed, "adapter": "acme-style"},
                           headers={"Authorization": f"Bearer {ACME}"})
    assert response.status_code == 200, response.text


def _usage(client) -> dict:
    answer = client.get("/v1/usage", headers={"Authorization": f"Bearer {OPERATOR}"})
    assert answer.status_code == 200, answer.text
    return {u["tenant"]: u for u in answer.json()}


def test_a_restarted_gateway_and_a_second_one_answer_everything_served(registry, tmp_path):
    with TestClient(_app(registry, tmp_path)) as first:
        _generate(first, 1)
        _generate(first, 2)
        assert _usage(first)["acme"]["requests"] == 2
    with TestClient(_app(registry, tmp_path)) as restarted, TestClient(_app(registry, tmp_path)) as second:
        assert _usage(restarted)["acme"]["requests"] == 2  # served before the restart
        _generate(second, 3)
        for client in (restarted, second):  # each answers for every gateway, within a flush
            deadline = time.monotonic() + 10
            while _usage(client)["acme"]["requests"] < 3 and time.monotonic() < deadline:
                time.sleep(0.1)
            usage = _usage(client)["acme"]
            assert usage["requests"] == 3 and usage["images"] == 3 and usage["replica_seconds"] > 0


def test_the_ledger_keeps_its_retention_skips_damaged_objects_and_outlives_a_failing_store(tmp_path):
    store = open_store(f"file://{tmp_path / 'store'}")
    old = UsageLedger(store, retention_s=3600, flush_s=0)
    old.add("acme", requests=1, at=time.time() - 3 * 3600)
    old.add("acme", requests=2, images=2)
    old.flush()
    assert [o.key for o in store.list("usage/")] and UsageLedger(store).usage("acme", 0)[0].requests == 2
    store.create("usage/0000000001/gw-damaged.json", b"{not json")
    store.create(f"usage/{int(time.time() // 3600)}/gw-other.json",
                 json.dumps({"buckets": {"acme": {"x": [1, 1, 1, 1]}}}).encode())  # a bad minute
    assert UsageLedger(store).usage(None, 0)[0].requests == 2
    UsageLedger(store, retention_s=3600, flush_s=0).flush()  # a first flush expires what is past retention,
    assert not any(o.key.startswith("usage/0000000001/") for o in store.list("usage/"))  # whoever wrote it

    failing = UsageLedger(open_store(f"file://{tmp_path / 'blocked'}"), flush_s=0)
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "usage").write_text("a file where the folder goes")
    failing.add("acme", requests=1)
    failing.flush()  # logged, kept in memory, retried at the next flush
    assert failing.usage("acme", time.time() - MINUTE)[0].requests == 1


class _CountingStore:
    """The real file store, counting the calls that reach it."""

    def __init__(self, store):
        self.store, self.calls = store, []

    def __getattr__(self, name):
        method = getattr(self.store, name)

        def counted(*args, **kwargs):
            self.calls.append(name)
            return method(*args, **kwargs)
        return counted


def test_an_idle_gateway_leaves_the_store_alone(tmp_path):
    """Flushes run every few seconds: with nothing served since the last one they write nothing,
    and retention is enforced (a listing of every gateway's objects) on the first flush, then only
    when the oldest kept hour moves on."""
    store = _CountingStore(open_store(f"file://{tmp_path / 'store'}"))
    ledger = UsageLedger(store, retention_s=3600, flush_s=0)
    ledger.add("acme", requests=1)
    ledger.flush()
    assert "list" in store.calls and "compare_and_swap" in store.calls
    store.calls.clear()
    for _ in range(3):
        ledger.flush()
    assert store.calls == []
    ledger.add("acme", requests=1)
    ledger.flush()
    assert "compare_and_swap" in store.calls and "list" not in store.calls
    assert UsageLedger(store.store).usage("acme", 0)[0].requests == 2


def test_gateways_share_usage_on_either_registry_backend(registry_uri):
    """The same ledger over the file store and a real S3 server (SeaweedFS): list, read, CAS."""
    first, second = (UsageLedger(open_store(registry_uri), flush_s=0) for _ in range(2))
    first.add("acme", requests=2, images=4, work=1.5)
    second.add("acme", requests=1, images=1, replica_seconds=0.25)
    second.add("globex", requests=1)
    for ledger in (first, second):
        ledger.flush()
    first.add("acme", requests=1)  # not flushed yet: the first answers it from memory, the second not
    answers = [{u.tenant: u for u in ledger.usage(None, time.time() - 3600)} for ledger in (first, second)]
    assert answers[0]["acme"].requests == 4 and answers[1]["acme"].requests == 3
    assert all(a["acme"].images == 5 and a["acme"].replica_seconds == 0.25 and a["globex"].requests == 1
               for a in answers)
    first.flush()  # a second flush of the same hour replaces the object (compare-and-swap on its token)
    assert {u.tenant: u for u in second.usage("acme", 0)}["acme"].requests == 4
