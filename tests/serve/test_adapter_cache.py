"""The replica's adapter tiers with a fake registry: budgets, LRU, pinning, verification."""

from __future__ import annotations

import threading

import pytest

from lorafleet.registry.errors import IntegrityError
from lorafleet.registry.identity import sha256_bytes
from lorafleet.registry.manifest import Manifest
from lorafleet.serve.adapter_cache import AdapterFetcher, ByteBudgetLRU, DiskTier
from lorafleet.synthetic import synthetic_lora


class FakeRegistry:
    """Serves blobs from memory and counts reads (a fake loader, as the unit tier allows)."""

    def __init__(self, blobs: dict[str, bytes]):
        self.blobs = blobs
        self.reads: list[str] = []
        self.lock = threading.Lock()

    def read_blob(self, manifest: Manifest) -> bytes:
        with self.lock:
            self.reads.append(manifest.digest)
        return self.blobs[manifest.digest]


def _adapters(spec, count: int) -> tuple[list[Manifest], dict[str, bytes]]:
    manifests, blobs = [], {}
    for index in range(count):
        data = synthetic_lora(spec, seed=index).to_bytes()
        digest = sha256_bytes(data)
        blobs[digest] = data
        manifests.append(Manifest(name=f"a{index}", version=1, digest=digest, size=len(data),
                                  format="diffusers_lora", method="lora",
                                  base={"id": "tiny", "fingerprint": spec.fingerprint}))
    return manifests, blobs


def test_lru_evicts_oldest_within_budget_and_keeps_pinned():
    lru = ByteBudgetLRU[str](budget_bytes=30)
    for key in "abc":
        assert lru.put(key, key, 10) == []
    lru.get("a")  # a is now the most recent
    with lru.pinned(["b"]):
        assert lru.put("d", "d", 10) == ["c"]
        assert lru.keys() == ["b", "a", "d"]
        assert lru.put("e", "e", 10) == ["a"]  # b is pinned
    assert lru.put("f", "f", 10) == ["b"]
    assert lru.put("huge", "x", 31) == [] and lru.get("huge") is None
    assert lru.bytes_used == 30 and lru.evictions == 3


def test_make_room_bounds_count_and_bytes_before_an_entry_is_built():
    """What the active tier relies on: room is made first (its evictions returned, to release),
    pinned keys stay, and nothing is evicted for an entry that already fits."""
    lru = ByteBudgetLRU[str](budget_bytes=100, max_items=2)
    lru.insert("a", "A", 10)
    lru.insert("b", "B", 10)
    with lru.pinned(["a", "c"]):
        assert lru.make_room(10) == [("b", "B")]  # the count bound: a is pinned
        lru.insert("c", "C", 10)
        assert lru.make_room(10) == []  # only pinned entries are left
    assert lru.make_room(85) == [("a", "A")]  # now the byte bound, least recent first
    assert lru.keys() == ["c"] and lru.evictions == 2


def test_host_hit_skips_disk_and_registry(tiny_spec, tmp_path):
    manifests, blobs = _adapters(tiny_spec, 1)
    registry = FakeRegistry(blobs)
    fetcher = AdapterFetcher(registry, host_bytes=10**8, disk=DiskTier(tmp_path, 10**8))
    assert fetcher.fetch(manifests[0]).tier == "registry"
    assert fetcher.fetch(manifests[0]).tier == "host"
    assert registry.reads == [manifests[0].digest]


def test_disk_tier_serves_after_host_eviction_and_survives_restart(tiny_spec, tmp_path):
    manifests, blobs = _adapters(tiny_spec, 3)
    registry = FakeRegistry(blobs)
    one_adapter = synthetic_lora(tiny_spec).num_parameters * 4
    fetcher = AdapterFetcher(registry, host_bytes=one_adapter, disk=DiskTier(tmp_path, 10**8))
    for manifest in manifests:
        fetcher.fetch(manifest)
    assert fetcher.host.keys() == [manifests[2].digest]
    assert fetcher.fetch(manifests[0]).tier == "disk"
    restarted = AdapterFetcher(registry, host_bytes=10**8, disk=DiskTier(tmp_path, 10**8))
    assert {restarted.fetch(m).tier for m in manifests} == {"disk"}
    assert len(registry.reads) == 3


def test_disk_budget_evicts_files(tiny_spec, tmp_path):
    manifests, blobs = _adapters(tiny_spec, 3)
    size = len(blobs[manifests[0].digest])
    disk = DiskTier(tmp_path, budget_bytes=2 * size)
    for manifest in manifests:
        disk.put(manifest.digest, blobs[manifest.digest])
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    assert disk.get(manifests[0].digest) is None and disk.get(manifests[2].digest) is not None
    assert disk.index.evictions == 1


def test_corrupted_disk_file_is_dropped_and_refetched(tiny_spec, tmp_path):
    manifests, blobs = _adapters(tiny_spec, 1)
    registry = FakeRegistry(blobs)
    disk = DiskTier(tmp_path, 10**8)
    AdapterFetcher(registry, 10**8, disk).fetch(manifests[0])
    path = next(tmp_path.glob("*.safetensors"))
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    fresh = AdapterFetcher(registry, 10**8, DiskTier(tmp_path, 10**8))
    assert fresh.fetch(manifests[0]).tier == "registry"
    assert fresh.disk.integrity_failures == 1


def test_registry_bytes_that_do_not_match_the_digest_are_never_cached(tiny_spec, tmp_path):
    manifests, blobs = _adapters(tiny_spec, 1)
    blobs[manifests[0].digest] = blobs[manifests[0].digest][:-1] + b"\x00"
    fetcher = AdapterFetcher(FakeRegistry(blobs), 10**8, DiskTier(tmp_path, 10**8))
    with pytest.raises(IntegrityError):
        fetcher.fetch(manifests[0])
    assert fetcher.host.keys() == [] and not list(tmp_path.glob("*.safetensors"))


def test_an_unwritable_disk_tier_fails_cleanly_and_serving_goes_on(tiny_spec, tmp_path):
    manifests, blobs = _adapters(tiny_spec, 1)
    disk = DiskTier(tmp_path / "cache", 10**8)
    disk.directory.rmdir()
    disk.directory.write_text("not a directory any more")  # every write now fails
    fetcher = AdapterFetcher(FakeRegistry(blobs), 10**8, disk)
    assert fetcher.fetch(manifests[0]).tier == "registry"
    assert fetcher.fetch(manifests[0]).tier == "host"
    assert disk.write_failures == 1


def test_concurrent_fetches_of_one_digest_read_the_registry_once(tiny_spec, tmp_path):
    manifests, blobs = _adapters(tiny_spec, 1)
    registry = FakeRegistry(blobs)
    fetcher = AdapterFetcher(registry, 10**8, None)
    threads = [threading.Thread(target=fetcher.fetch, args=(manifests[0],)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert registry.reads == [manifests[0].digest]


def _forged(registry, spec, tmp_path):
    """A version whose stored blob and manifest digest were swapped by someone with bucket access
    for a file that never passed validation: a LoRA with shapes the base does not have."""
    import torch
    from helpers import publish_lora

    from lorafleet.registry.adapter_registry import blob_key, manifest_key
    from lorafleet.registry.identity import sha256_bytes
    from lorafleet.synthetic import synthetic_lora

    manifest = publish_lora(registry, spec, tmp_path, name="forged")
    payload = synthetic_lora(spec, seed=5)
    for key in list(payload.tensors)[:2]:
        payload.tensors[key] = torch.ones(3, 5)
    data = payload.to_bytes({"base_fingerprint": spec.fingerprint, "base_id": spec.id})
    digest = sha256_bytes(data)
    (tmp_path / "forged.bin").write_bytes(data)
    registry.store.put_blob(blob_key(digest), tmp_path / "forged.bin")
    forged = manifest.model_copy(update={"digest": digest, "size": len(data)})
    registry.store.delete(manifest_key("forged", 1))
    registry.store.create(manifest_key("forged", 1), forged.to_json_bytes())
    return registry.resolve("forged@1")


def test_bytes_that_do_not_fit_the_base_never_reach_the_pipeline(tiny_spec, tmp_path):
    from lorafleet.registry import AdapterRegistry
    from lorafleet.registry.errors import AdapterIncompatible

    registry = AdapterRegistry(f"file://{tmp_path / 'reg'}")
    manifest = _forged(registry, tiny_spec, tmp_path)
    fetcher = AdapterFetcher(registry, 10**8, DiskTier(tmp_path / "disk", 10**8), base=tiny_spec)
    with pytest.raises(AdapterIncompatible):
        fetcher.fetch(manifest)
    assert fetcher.host.keys() == []
