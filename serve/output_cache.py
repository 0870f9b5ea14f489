"""Finished outputs by request key: a repeat of a seeded request is answered without generating.

A seeded request is deterministic given the base's fingerprint, the adapters' digests and weights,
the prompts, every generation parameter, the seeds and the output format; ``output_key`` hashes
exactly those (after alias resolution, so an alias moved to another version is another key). Two
tiers, each LRU within a byte budget:

- memory, in the gateway;
- optional shared, in object storage (any registry URI scheme: the registry's own bucket under
  ``output-cache/``, or another), content-addressed by the key, entries older than a TTL ignored
  and removed, the oldest removed beyond a byte budget; several gateways share it.

The service never stores an unseeded request or one that opts out, and never answers from an entry
whose adapter versions have since been yanked (it checks, at most ``recheck_s`` old).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass

from lorafleet.errors import LorafleetError
from lorafleet.registry.storage import ObjectExists, open_store

from .adapter_cache import ByteBudgetLRU
from .jobs import GenerationJob

logger = logging.getLogger(__name__)

SHARED_PREFIX = "output-cache/"
SWEEP_EVERY_S = 60.0  # how often the shared tier is listed to enforce its byte budget


def output_key(base_fingerprint: str, adapters: list[tuple[str, float]], job: GenerationJob,
               output_format: str, tenant: str | None = None) -> str:
    """The hex digest naming a seeded request's output: everything that decides its bytes, and the
    tenant asking (outputs are never shared across tenants)."""
    described = {"tenant": tenant,
                 "base": base_fingerprint, "adapters": sorted([digest, float(weight)] for digest, weight in adapters),
                 "prompt": job.prompt, "negative_prompt": job.negative_prompt, "steps": job.steps,
                 "guidance_scale": float(job.guidance_scale), "true_cfg_scale": float(job.true_cfg_scale),
                 "width": job.width, "height": job.height, "seeds": list(job.seeds), "format": output_format}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class AdapterVersion:
    name: str
    version: int
    digest: str


@dataclass(frozen=True)
class CachedOutput:
    images: tuple[str, ...]  # base64, as the response carries them
    adapters: tuple[AdapterVersion, ...]
    created: float  # unix seconds

    @property
    def nbytes(self) -> int:
        return sum(len(image) for image in self.images) + 256

    def to_bytes(self) -> bytes:
        return json.dumps({"images": list(self.images), "created": self.created,
                           "adapters": [[a.name, a.version, a.digest] for a in self.adapters]}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> CachedOutput:
        tree = json.loads(data)
        return cls(tuple(tree["images"]), tuple(AdapterVersion(n, int(v), d) for n, v, d in tree["adapters"]),
                   float(tree["created"]))


class OutputCache:
    def __init__(self, memory_bytes: int, shared_uri: str | None = None, shared_ttl_s: float = 86_400.0,
                 shared_bytes: int = 10 * 1024**3, metrics=None):
        self.memory: ByteBudgetLRU[CachedOutput] = ByteBudgetLRU(memory_bytes)
        self.shared = open_store(shared_uri) if shared_uri else None
        self.shared_ttl_s, self.shared_bytes = shared_ttl_s, shared_bytes
        self.metrics = metrics
        self._lock = threading.Lock()
        self._last_sweep = 0.0

    def get(self, key: str) -> CachedOutput | None:
        found = self.memory.get(key)
        if found is not None:
            self._count("hits", "memory")
            return found
        found = self._shared_get(key)
        if found is None:
            self._count("misses", "shared" if self.shared else "memory")
            return None
        self._count("hits", "shared")
        self._memory_put(key, found)
        return found

    def put(self, key: str, output: CachedOutput) -> None:
        self._memory_put(key, output)
        if self.shared is not None:
            try:
                self.shared.create(SHARED_PREFIX + key, output.to_bytes())
                self._maybe_sweep()
            except ObjectExists:
                pass  # content-addressed: another gateway stored these bytes already
            except LorafleetError as exc:  # the shared tier is an optimisation: never fail a request on it
                logger.warning("output cache: shared write of %s failed: %s", key[:16], exc)

    def forget(self, key: str) -> None:
        self.memory.pop(key)
        if self.shared is not None:
            try:
                self.shared.delete(SHARED_PREFIX + key)
            except LorafleetError as exc:
                logger.warning("output cache: shared delete of %s failed: %s", key[:16], exc)

    def _memory_put(self, key: str, output: CachedOutput) -> None:
        evicted = self.memory.put(key, output, output.nbytes)
        if self.metrics is not None:
            self.metrics.output_cache_bytes.set(self.memory.bytes_used)
            if evicted:
                self.metrics.output_cache_evictions.labels(tier="memory").inc(len(evicted))

    def _shared_get(self, key: str) -> CachedOutput | None:
        if self.shared is None:
            return None
        try:
            stored = self.shared.read(SHARED_PREFIX + key)
        except LorafleetError as exc:  # the store is down: a miss, the entry stays
            logger.warning("output cache: shared read of %s failed: %s", key[:16], exc)
            return None
        if stored is None:
            return None
        try:
            output = CachedOutput.from_bytes(stored.data)
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("output cache: shared entry %s unreadable (%s); removed", key[:16], exc)
            self.forget(key)  # so that the fresh output is stored in its place
            return None
        if time.time() - output.created > self.shared_ttl_s:
            self.forget(key)
            return None
        return output

    def _maybe_sweep(self) -> None:
        """Remove expired shared entries, then the oldest beyond the byte budget."""
        now = time.time()
        with self._lock:  # one sweep at a time
            if now - self._last_sweep < SWEEP_EVERY_S:
                return
            self._last_sweep = now
        entries = sorted(self.shared.list(SHARED_PREFIX), key=lambda info: info.modified)
        total = sum(info.size for info in entries)
        for info in entries:
            if now - info.modified <= self.shared_ttl_s and total <= self.shared_bytes:
                break
            self.shared.delete(info.key)
            total -= info.size
            if self.metrics is not None:
                self.metrics.output_cache_evictions.labels(tier="shared").inc()

    def _count(self, outcome: str, tier: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, f"output_cache_{outcome}").labels(tier=tier).inc()
