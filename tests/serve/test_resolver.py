"""The gateway's resolver: hits and misses are cached for the alias TTL, so a generate token
cannot multiply registry calls with bad references."""

from __future__ import annotations

import pytest
from helpers import publish_lora

from lorafleet.registry import AdapterRegistry
from lorafleet.registry.errors import AdapterNotFound, AliasNotFound, VersionNotFound
from lorafleet.serve.resolver import AdapterResolver


class _CountingStore:
    """The real file store, counting the calls that reach it."""

    def __init__(self, store):
        self._store, self.calls = store, 0

    def __getattr__(self, name):
        attribute = getattr(self._store, name)
        if callable(attribute):
            def counted(*args, **kwargs):
                self.calls += 1
                return attribute(*args, **kwargs)
            return counted
        return attribute


@pytest.fixture
def counted(tmp_path, tiny_spec):
    registry = AdapterRegistry(f"file://{tmp_path / 'reg'}")
    publish_lora(registry, tiny_spec, tmp_path, name="style", aliases=["prod"])
    store = _CountingStore(registry.store)
    return AdapterRegistry(store=store), store


@pytest.mark.parametrize("ref, error", [
    ("missing", AdapterNotFound),
    ("missing:prod", AliasNotFound),
    ("style:canary", AliasNotFound),
    ("style@7", VersionNotFound),
    ("style@sha256:" + "0" * 64, VersionNotFound),
])
def test_misses_are_cached_for_the_ttl(counted, ref, error):
    registry, store = counted
    resolver = AdapterResolver(registry, ttl_s=60)
    for _ in range(50):
        with pytest.raises(error) as caught:
            resolver.resolve(ref, "adapter")
        assert caught.value.field == "adapter"
    assert 0 < store.calls <= 3, f"{store.calls} registry calls for 50 look-ups of {ref}"


def test_a_miss_expires_with_the_ttl(counted, tiny_spec, tmp_path):
    registry, store = counted
    resolver = AdapterResolver(registry, ttl_s=0)  # no reuse: every look-up asks the registry
    with pytest.raises(AdapterNotFound):
        resolver.resolve("later", "adapter")
    publish_lora(registry, tiny_spec, tmp_path, name="later")
    assert resolver.resolve("later", "adapter").name == "later"


def test_the_cache_is_bounded(counted):
    registry, _ = counted
    resolver = AdapterResolver(registry, ttl_s=60, max_entries=10)
    for index in range(100):
        with pytest.raises(AdapterNotFound):
            resolver.resolve(f"missing-{index}", "adapter")
    assert len(resolver._cache) == 10


def test_memory_only_answers_what_is_held_and_never_reads_the_registry(counted):
    from lorafleet.serve.resolver import NotInMemory

    registry, store = counted
    resolver, stale = AdapterResolver(registry, ttl_s=60), AdapterResolver(registry, ttl_s=0)

    def from_memory(resolver, ref):
        calls = store.calls
        try:
            return resolver.resolve(ref, "adapter", memory_only=True)
        finally:
            assert store.calls == calls, ref

    for ref in ("style@1", "style:prod", "style"):
        with pytest.raises(NotInMemory):
            from_memory(resolver, ref)
    held = {ref: resolver.resolve(ref, "adapter") for ref in ("style@1", "style:prod", "style")}
    assert {ref: from_memory(resolver, ref) for ref in held} == held
    with pytest.raises(AdapterNotFound):
        resolver.resolve("missing", "adapter")
    with pytest.raises(AdapterNotFound):  # a miss is held too: answered, not deferred
        from_memory(resolver, "missing")
    stale.resolve("style:prod", "adapter")
    with pytest.raises(NotInMemory):  # an alias past its TTL is read again
        from_memory(stale, "style:prod")
    assert from_memory(stale, "style@1") == held["style@1"]  # an exact version is held for good
