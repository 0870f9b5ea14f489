"""Where a replica keeps adapters: host memory and local disk tiers in front of the registry.

    active (in the pipeline, see engine.py) -> host (parsed state dicts) -> disk (files by digest)
    -> registry

Every tier is keyed by the adapter's digest and bounded by a byte budget with LRU eviction.
``AdapterFetcher`` walks the chain: a hit in a faster tier skips the slower ones, and the
fetched bytes are verified against the digest before they are parsed or cached.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from lorafleet.bases.spec import BaseSpec
from lorafleet.errors import LorafleetError
from lorafleet.registry.errors import AdapterIncompatible, IntegrityError
from lorafleet.registry.formats import payload_from_stored
from lorafleet.registry.identity import sha256_bytes, validate_digest
from lorafleet.registry.manifest import Manifest
from lorafleet.registry.payload import AdapterPayload
from lorafleet.registry.validation import validate_payload

from .residency import Residency, Tier, TierResidency

V = TypeVar("V")
logger = logging.getLogger(__name__)


class ByteBudgetLRU(Generic[V]):
    """A thread-safe LRU map bounded by the total size of its values (and optionally by count).

    Pinned keys are never evicted: a caller pins what it is about to use so that making room for
    one entry cannot evict another the same request needs. Held keys (``hold``: what an operator
    pinned) are never evicted either, until they are no longer held.
    """

    def __init__(self, budget_bytes: int, max_items: int | None = None):
        self.budget_bytes = budget_bytes
        self.max_items = max_items
        self._items: OrderedDict[str, tuple[V, int]] = OrderedDict()
        self._pins: dict[str, int] = {}
        self._held: frozenset[str] = frozenset()
        self._lock = threading.Lock()
        self.evictions = 0

    def get(self, key: str) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: str, value: V, size: int) -> list[str]:
        """Store ``value``, evicting after it; returns the keys evicted (nothing is stored if
        ``value`` alone is over the budget)."""
        with self._lock:
            if size > self.budget_bytes:
                return []
            self._items.pop(key, None)
            self._items[key] = (value, size)
            return [key for key, _ in self._evict_until_fits(incoming=0, keep=key)]

    def make_room(self, size: int) -> list[tuple[str, V]]:
        """Evict unpinned entries, least recently used first, until one more entry of ``size``
        fits in count and bytes (or only pinned ones are left); returns what it evicted, so that
        the caller can release it. Use before building an entry that costs memory to build."""
        with self._lock:
            return self._evict_until_fits(incoming=size, keep=None)

    def insert(self, key: str, value: V, size: int) -> None:
        """Store ``value`` without evicting anything (after ``make_room``)."""
        with self._lock:
            self._items.pop(key, None)
            self._items[key] = (value, size)

    def _evict_until_fits(self, incoming: int, keep: str | None) -> list[tuple[str, V]]:
        evicted = []
        room_for = 0 if keep is not None else 1  # ``put`` has stored its entry already
        for key in list(self._items):
            if self._fits_locked(incoming, room_for):
                break
            if key != keep and not self._pins.get(key) and key not in self._held:
                evicted.append((key, self._items.pop(key)[0]))
        self.evictions += len(evicted)
        return evicted

    def _fits_locked(self, incoming: int, room_for: int) -> bool:
        count_fits = self.max_items is None or len(self._items) + room_for <= self.max_items
        return count_fits and self._bytes_locked() + incoming <= self.budget_bytes

    def _bytes_locked(self) -> int:
        return sum(size for _, size in self._items.values())

    def hold(self, keys: set[str]) -> None:
        """Exactly these keys are kept across evictions from now on (present yet or not)."""
        with self._lock:
            self._held = frozenset(keys)

    @property
    def held(self) -> frozenset[str]:
        return self._held

    @contextmanager
    def pinned(self, keys: list[str]) -> Iterator[None]:
        """Keys that no eviction may take while the block runs (present yet or not)."""
        with self._lock:
            for key in keys:
                self._pins[key] = self._pins.get(key, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                for key in keys:
                    self._pins[key] -= 1
                    if not self._pins[key]:
                        del self._pins[key]

    def pop(self, key: str) -> V | None:
        with self._lock:
            item = self._items.pop(key, None)
            return None if item is None else item[0]

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._items)

    def values(self) -> list[V]:
        with self._lock:
            return [value for value, _ in self._items.values()]

    def items(self) -> list[tuple[str, V]]:
        with self._lock:
            return [(key, value) for key, (value, _) in self._items.items()]

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def bytes_used(self) -> int:
        with self._lock:
            return self._bytes_locked()


@dataclass
class CachedAdapter:
    """An adapter parsed into host memory. Its tensors are never handed to a model directly."""

    manifest: Manifest
    payload: AdapterPayload

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.payload.tensors.values())


class DiskTier:
    """Verified adapter files in a local directory, named by digest, LRU within a byte budget."""

    def __init__(self, directory: Path, budget_bytes: int):
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.index: ByteBudgetLRU[Path] = ByteBudgetLRU(budget_bytes)
        self.integrity_failures = 0
        self.write_failures = 0
        for path in sorted(self.directory.glob("*.safetensors"), key=lambda p: p.stat().st_mtime):
            self.index.put("sha256:" + path.stem, path, path.stat().st_size)

    def _path(self, digest: str) -> Path:
        return self.directory / (validate_digest(digest).split(":", 1)[1] + ".safetensors")

    def get(self, digest: str) -> bytes | None:
        path = self.index.get(digest)
        if path is None:
            return None
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self.index.pop(digest)
            return None
        if sha256_bytes(data) != digest:  # corrupted on disk: drop it, fetch again
            self.integrity_failures += 1
            self.index.pop(digest)
            path.unlink(missing_ok=True)
            return None
        return data

    def put(self, digest: str, data: bytes) -> list[str]:
        """Cache verified bytes; a full or failing disk only skips caching (serving goes on)."""
        path = self._path(digest)
        if not self._write_atomically(path, data):
            return []
        evicted = self.index.put(digest, path, len(data))
        for key in evicted:
            self._path(key).unlink(missing_ok=True)
        if self.index.get(digest) is None:  # larger than the whole budget
            path.unlink(missing_ok=True)
        return evicted

    def _write_atomically(self, path: Path, data: bytes) -> bool:
        tmp = None
        try:
            fd, name = tempfile.mkstemp(dir=self.directory, prefix=".part-")
            tmp = Path(name)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
            return True
        except OSError as exc:  # full, read-only or broken: serve from memory, say so in the log
            self.write_failures += 1
            logger.warning("disk cache %s: cannot write %s (%s)", self.directory, path.name, exc)
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            return False


@dataclass
class FetchResult:
    adapter: CachedAdapter
    tier: Tier  # host, disk or registry
    seconds: float


@dataclass
class _Flight:
    lock: threading.Lock = field(default_factory=threading.Lock)


class AdapterFetcher:
    """Host tier -> disk tier -> registry, one fetch per digest at a time.

    Bytes from the registry or the disk tier are checked again before they reach the host tier
    (and so the pipeline): the digest, that they parse, and, once ``base`` is known, that they fit
    it (validation at publish time is not trusted: storage can be written by others)."""

    def __init__(self, registry, host_bytes: int, disk: DiskTier | None, base: BaseSpec | None = None):
        self.registry = registry
        self.host: ByteBudgetLRU[CachedAdapter] = ByteBudgetLRU(host_bytes)
        self.disk = disk
        self.base = base
        self._flights: dict[str, _Flight] = {}
        self._flights_lock = threading.Lock()

    def _flight(self, digest: str) -> _Flight:
        with self._flights_lock:
            return self._flights.setdefault(digest, _Flight())

    def held(self, manifest: Manifest) -> FetchResult | None:
        """The adapter from host memory, or None if fetching it would read the disk or the store."""
        started = time.perf_counter()
        cached = self.host.get(manifest.digest)
        return FetchResult(cached, Tier.host, time.perf_counter() - started) if cached is not None else None

    def fetch(self, manifest: Manifest) -> FetchResult:
        started = time.perf_counter()
        if (held := self.held(manifest)) is not None:
            return held
        with self._flight(manifest.digest).lock:  # others fetching other digests go on
            cached = self.host.get(manifest.digest)
            if cached is not None:
                return FetchResult(cached, Tier.host, time.perf_counter() - started)
            data, tier = self._bytes(manifest)
            adapter = CachedAdapter(manifest, self._checked_payload(manifest, data))
            self.host.put(manifest.digest, adapter, adapter.nbytes)
            return FetchResult(adapter, tier, time.perf_counter() - started)

    def _checked_payload(self, manifest: Manifest, data: bytes) -> AdapterPayload:
        try:
            payload = payload_from_stored(data)
        except LorafleetError:
            raise
        except Exception as exc:  # bytes that match their digest but do not parse: written by someone else
            raise IntegrityError(f"stored blob of {manifest.adapter_id} cannot be read: {exc}") from exc
        if self.base is not None:
            if manifest.base.fingerprint != self.base.fingerprint:
                raise AdapterIncompatible(f"{manifest.adapter_id} was published for base {manifest.base.id} "
                                          f"({manifest.base.fingerprint[:19]}), not this server's {self.base.id}",
                                          field="adapter")
            validate_payload(payload, self.base)
        return payload

    def _bytes(self, manifest: Manifest) -> tuple[bytes, Tier]:
        data = self.disk.get(manifest.digest) if self.disk else None
        if data is not None:
            return data, Tier.disk
        data = self.registry.read_blob(manifest)  # verified against the digest
        if sha256_bytes(data) != manifest.digest:
            raise IntegrityError(f"blob of {manifest.adapter_id} does not match its digest")
        if self.disk:
            self.disk.put(manifest.digest, data)
        return data, Tier.registry

    def resident(self) -> Residency:
        tiers = {Tier.host: TierResidency(tuple(self.host.keys()), self.host.bytes_used, self.host.evictions)}
        if self.disk:
            tiers[Tier.disk] = TierResidency(tuple(self.disk.index.keys()), self.disk.index.bytes_used,
                                             self.disk.index.evictions, self.disk.write_failures,
                                             self.disk.integrity_failures)
        return tiers
