"""Adapter references to manifests, for the gateway: aliases and `latest` cached for a short TTL,
exact versions for good, misses cached too; the last known answer when the registry is down."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from lorafleet.errors import LorafleetError
from lorafleet.registry import AdapterRef, AdapterRegistry, AliasRecord, Manifest
from lorafleet.registry.errors import AdapterNotFound, RegistryUnavailable, YankedVersion
from lorafleet.registry.identity import LATEST


class NotInMemory(Exception):
    """Resolving this reference needs the registry (not an error: resolve it where I/O may wait)."""


@dataclass
class _Resolution:
    manifest: Manifest | AliasRecord | None  # None: a cached miss
    at: float
    miss: LorafleetError | None = None


class AdapterResolver:
    """ref -> manifest. Alias records and `latest` resolutions live ``ttl_s``; exact versions
    forever. An alias's record (its version, or its canary split) is cached, and each caller key
    then picks its version of a split. Misses (no such adapter, version, alias; yanked) are cached
    for ``ttl_s`` too, so a caller repeating a bad reference cannot multiply registry calls; at most
    ``max_entries`` are kept.

    When the registry is unreachable, the last known resolution is used (cached adapters keep
    serving); a ref never resolved before raises RegistryUnavailable (503).
    """

    def __init__(self, registry: AdapterRegistry, ttl_s: float, max_entries: int = 10_000):
        self.registry = registry
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._cache: OrderedDict[AdapterRef, _Resolution] = OrderedDict()
        self._lock = threading.Lock()

    def resolve(self, ref_text: str, field: str, key: str | None = None, *, memory_only: bool = False) -> Manifest:
        """The manifest ``ref_text`` names for the caller ``key`` (which version of a split it gets).
        ``memory_only``: raise NotInMemory rather than read the registry (the caller then resolves
        off its event loop)."""
        ref = AdapterRef.parse(ref_text, field=field)
        if ref.alias is None or ref.alias == LATEST:
            return self._fetch(ref, field, lambda: self.registry.resolve(ref), memory_only)
        record = self._fetch(ref, field, lambda: self.registry.alias_record(ref.name, ref.alias), memory_only)
        version = record.version_for(key)
        manifest = self._fetch(AdapterRef(name=ref.name, version=version), field,
                               lambda: self.registry.resolve(f"{ref.name}@{version}"), memory_only)
        if manifest.yanked:
            raise YankedVersion(f"{ref} points to {ref.name}@{version}, which is yanked; move the alias", field=field)
        return manifest

    def _fetch(self, ref: AdapterRef, field: str, load, memory_only: bool):
        known = self._cached(ref)
        exact = ref.version is not None or ref.digest is not None
        fresh = known is not None and time.monotonic() - known.at < self.ttl_s
        if known and known.miss is not None and fresh:
            raise type(known.miss)(known.miss.message, field=field)
        if known and known.manifest is not None and (exact or fresh):
            return known.manifest
        if memory_only:
            raise NotInMemory(ref)
        try:
            manifest = load()
        except RegistryUnavailable:
            if known and known.manifest is not None:
                return known.manifest
            raise
        except (AdapterNotFound, YankedVersion) as exc:
            self._remember(ref, _Resolution(None, time.monotonic(), miss=exc))
            exc.field = field
            raise
        except LorafleetError as exc:
            exc.field = field
            raise
        self._remember(ref, _Resolution(manifest, time.monotonic()))
        return manifest

    def _cached(self, ref: AdapterRef) -> _Resolution | None:
        with self._lock:
            found = self._cache.get(ref)
            if found is not None:
                self._cache.move_to_end(ref)
            return found

    def _remember(self, ref: AdapterRef, resolution: _Resolution) -> None:
        with self._lock:
            self._cache[ref] = resolution
            self._cache.move_to_end(ref)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
