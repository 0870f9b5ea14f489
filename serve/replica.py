"""A generator replica: one frozen base pipeline, its adapter tiers, and generation.

Plain Python (no Ray): the Ray deployment in app.py wraps it, and tests use it directly.
"""

from __future__ import annotations

import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from lorafleet.registry import AdapterRegistry
from lorafleet.registry.manifest import Manifest

from lorafleet.accelerator import resolve_placement

from .adapter_cache import AdapterFetcher, DiskTier
from .engine import AdapterUse, GenerationJob, PipelineEngine
from .settings import ServeSettings


@dataclass(frozen=True)
class GenerationTask:
    """What the gateway sends a replica: resolved adapters with weights, and the job."""

    adapters: tuple[tuple[Manifest, float], ...]
    job: GenerationJob
    set_id: str


@dataclass
class AdapterFetch:
    digest: str
    tier: str  # where it came from: active | host | disk | registry
    seconds: float


@dataclass
class GenerationOutput:
    images: np.ndarray  # [n, height, width, 3] float32
    fetches: list[AdapterFetch]
    fetch_ms: float
    activate_ms: float
    generation_ms: float
    replica: str
    evicted_active: list[str] = field(default_factory=list)
    fuse_events: list[str] = field(default_factory=list)
    resident: dict = field(default_factory=dict)


def load_replica_base(settings: ServeSettings):
    """The base pipeline on the configured device and dtype."""
    from lorafleet.bases import load_base

    loaded = load_base(settings.base, base_config=settings.base_config)
    placement = resolve_placement(settings.device, settings.dtype)
    if placement.dtype != loaded.pipeline.unet.dtype:
        loaded.pipeline.to(dtype=placement.dtype)
    if placement.device.type != "cpu":
        loaded.pipeline.to(placement.device)
    return loaded, placement


class GeneratorReplica:
    def __init__(self, settings: ServeSettings, registry: AdapterRegistry | None = None):
        self.settings = settings
        self.base, self.placement = load_replica_base(settings)
        self.registry = registry or AdapterRegistry(settings.registry)
        disk = DiskTier(settings.cache.disk_dir, settings.cache.disk_bytes) if settings.cache.disk_bytes else None
        self.fetcher = AdapterFetcher(self.registry, settings.cache.host_bytes, disk)
        self.engine = PipelineEngine(self.base.pipeline, self.placement, settings.cache.active_max_adapters,
                                     settings.fuse_after, settings.cache.active_bytes)
        self.replica_id = f"{socket.gethostname()}:{os.getpid()}"
        # Every torch call on the pipeline runs on this one thread: OpenMP keeps a thread team
        # per calling thread, and several idle teams spinning on 2 cores starve the busy one.
        self._pipeline_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorafleet-pipeline")

    def _fetch(self, task: GenerationTask) -> tuple[list[AdapterUse], list[AdapterFetch]]:
        uses, fetches = [], []
        for manifest, weight in task.adapters:
            active = manifest.digest in self.engine.active
            result = self.fetcher.fetch(manifest)
            uses.append(AdapterUse(result.adapter, weight))
            fetches.append(AdapterFetch(manifest.digest, "active" if active else result.tier, result.seconds))
        return uses, fetches

    def generate(self, task: GenerationTask) -> GenerationOutput:
        started = time.perf_counter()
        uses, fetches = self._fetch(task)
        fetched = time.perf_counter()
        result = self._pipeline_thread.submit(self.engine.run, uses, task.job).result()
        return GenerationOutput(
            images=result.images, fetches=fetches, fetch_ms=1000 * (fetched - started),
            activate_ms=result.activate_ms, generation_ms=result.generation_ms, replica=self.replica_id,
            evicted_active=result.evicted, fuse_events=result.fuse_events, resident=self.resident(),
        )

    def resident(self) -> dict:
        tiers = self.fetcher.resident()
        tiers["active"] = {"digests": list(self.engine.active), "bytes": self.engine.active_bytes, "evictions": 0}
        return tiers

    def health(self) -> dict:
        pipe = self.base.pipeline
        native_size = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        return {"base": self.base.id, "base_fingerprint": self.base.fingerprint, "replica": self.replica_id,
                "native_size": native_size, "torch_threads": torch.get_num_threads(),
                "device": str(self.placement.device), "dtype": str(self.placement.dtype).removeprefix("torch.")}
