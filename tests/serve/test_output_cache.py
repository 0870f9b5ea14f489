"""The output cache through the HTTP API (the in-process app on `tiny`): a seeded repeat is answered
from the cache byte for byte, never an unseeded or opted-out request, never across a different
adapter weight or alias target, never after a version it used is yanked; a second gateway shares
the object-storage tier; the metrics count it all."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from helpers import write_lora

from lorafleet.registry import AdapterRegistry, PublishRequest
from lorafleet.serve.app import create_local_app
from lorafleet.serve.settings import ServeSettings

BODY = {"prompt": "a red circle", "steps": 2, "seed": 7, "output_format": "npy"}


@pytest.fixture
def registry(tmp_path, tiny_spec):
    registry = AdapterRegistry(f"file://{tmp_path / 'registry'}")
    for version, seed in ((1, 1), (2, 2)):
        path = write_lora(tmp_path / f"src{version}", tiny_spec, seed=seed)
        registry.publish(path, PublishRequest(name="style", base=tiny_spec, aliases=["prod"] if version == 1 else []))
    return registry


def _client(registry, tmp_path, **output_cache):
    settings = ServeSettings(base="tiny", registry=registry.uri, resolution_ttl_s=0,
                             cache={"disk_dir": str(tmp_path / "adapters")},
                             output_cache={"recheck_s": 0, **output_cache})
    app, _ = create_local_app(settings, registry)
    return TestClient(app)


def _post(client, **fields):
    answer = client.post("/v1/generate", json={**BODY, **fields})
    assert answer.status_code == 200, answer.text
    return answer


def test_a_seeded_repeat_is_answered_from_the_cache_byte_for_byte(registry, tmp_path):
    with _client(registry, tmp_path) as client:
        first, again = _post(client, adapter="style:prod"), _post(client, adapter="style:prod")
        assert (first.headers["X-Cache"], again.headers["X-Cache"]) == ("miss", "hit")
        assert first.json()["images"] == again.json()["images"] and first.headers["ETag"] == again.headers["ETag"]
        assert again.json()["timings"]["adapter_mode"] == "cache" and again.json()["adapters"][0]["version"] == 1
        fresh = _post(client, adapter="style:prod", cache=False)  # generated again: the same bytes
        assert fresh.headers["X-Cache"] == "miss" and fresh.json()["images"] == first.json()["images"]
        for changed in ({"adapters": [{"ref": "style:prod", "weight": 0.5}]}, {"adapter": "style@2"},
                        {"adapter": "style:prod", "seed": 8}, {"adapter": "style:prod", "steps": 3},
                        {"adapter": "style:prod", "output_format": "png"}):
            assert _post(client, **changed).headers["X-Cache"] == "miss", changed
        unseeded = {k: v for k, v in BODY.items() if k != "seed"}
        for _ in range(2):
            answer = client.post("/v1/generate", json=unseeded)
            assert answer.headers["X-Cache"] == "miss" and "ETag" not in answer.headers
        metrics = client.get("/metrics").text
    assert 'lorafleet_output_cache_hits_total{tier="memory"} 1.0' in metrics
    assert "lorafleet_output_cache_bytes" in metrics


def test_an_alias_moved_or_a_version_yanked_is_never_answered_from_the_cache(registry, tmp_path):
    with _client(registry, tmp_path) as client:
        on_one = _post(client, adapter="style:prod")
        registry.set_alias("style", "prod", 2)
        moved = _post(client, adapter="style:prod")
        assert moved.headers["X-Cache"] == "miss" and moved.json()["adapters"][0]["version"] == 2
        assert moved.json()["images"] != on_one.json()["images"]
        exact = _post(client, adapter="style@1")  # the version prod named at first: the same digest, the same key
        assert exact.headers["X-Cache"] == "hit" and exact.json()["images"] == on_one.json()["images"]
        registry.yank("style@1", reason="bad outputs")
        after = _post(client, adapter="style@1")  # an exact pin still generates (yank semantics) but fresh
        assert after.headers["X-Cache"] == "miss" and after.json()["images"] == on_one.json()["images"]
        assert _post(client, adapter="style@1").headers["X-Cache"] == "miss"  # and is not stored again


def test_two_gateways_share_the_object_storage_tier(registry, tmp_path):
    shared = f"file://{tmp_path / 'outputs'}"
    with _client(registry, tmp_path, shared_uri=shared) as first:
        stored = _post(first, adapter="style:prod")
    with _client(registry, tmp_path, shared_uri=shared) as second:  # a fresh gateway: empty memory tier
        answer = _post(second, adapter="style:prod")
        metrics = second.get("/metrics").text
    assert answer.headers["X-Cache"] == "hit" and answer.json()["images"] == stored.json()["images"]
    assert 'lorafleet_output_cache_hits_total{tier="shared"} 1.0' in metrics
    with _client(registry, tmp_path, shared_uri=shared, shared_ttl_s=1e-6) as expired:
        assert _post(expired, adapter="style:prod").headers["X-Cache"] == "miss"


def test_cache_takes_only_a_json_boolean(registry, tmp_path):
    with _client(registry, tmp_path) as client:
        for value in (0, 1, "false", None):
            answer = client.post("/v1/generate", json={**BODY, "cache": value})
            assert answer.status_code == 422 and answer.json()["error"]["field"] == "cache", (value, answer.text)


def test_the_cache_can_be_switched_off(registry, tmp_path):
    with _client(registry, tmp_path, enabled=False) as client:
        assert [_post(client).headers["X-Cache"] for _ in range(2)] == ["miss", "miss"]


def test_identical_requests_at_once_share_one_generation(registry, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with _client(registry, tmp_path) as client:
        def generations() -> float:
            lines = [line for line in client.get("/metrics").text.splitlines()
                     if line.startswith("lorafleet_generations_by_mode_total")]
            return sum(float(line.rsplit(" ", 1)[1]) for line in lines)

        before = generations()
        with ThreadPoolExecutor(max_workers=6) as pool:
            answers = list(pool.map(lambda _: _post(client, adapter="style:prod", steps=6), range(6)))
        assert sorted(answer.headers["X-Cache"] for answer in answers) == ["hit"] * 5 + ["miss"]
        assert len({tuple(answer.json()["images"]) for answer in answers}) == 1
        assert generations() - before == 1


def test_an_unreadable_shared_entry_is_replaced_by_the_fresh_output(registry, tmp_path):
    from lorafleet.registry.storage import open_store
    from lorafleet.serve.output_cache import SHARED_PREFIX

    shared = f"file://{tmp_path / 'outputs'}"
    with _client(registry, tmp_path, shared_uri=shared) as first:
        stored = _post(first, adapter="style:prod")
    store = open_store(shared)
    key = stored.headers["ETag"].strip('"')
    store.compare_and_swap(SHARED_PREFIX + key, b"{not json", store.read(SHARED_PREFIX + key).token)
    with _client(registry, tmp_path, shared_uri=shared) as second:
        assert _post(second, adapter="style:prod").headers["X-Cache"] == "miss"
    with _client(registry, tmp_path, shared_uri=shared) as third:
        again = _post(third, adapter="style:prod")
    assert again.headers["X-Cache"] == "hit" and again.json()["images"] == stored.json()["images"]
