"""A generator replica: one frozen base pipeline, its adapter tiers, and generation.

Plain Python (no Ray): the Ray deployment in app.py wraps it, and tests use it directly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from lorafleet.accelerator import resolve_placement
from lorafleet.bases import load_base
from lorafleet.errors import LorafleetError
from lorafleet.registry import AdapterRegistry
from lorafleet.registry.layout import PinRecord
from lorafleet.registry.manifest import Manifest

from .adapter_cache import AdapterFetcher, DiskTier, FetchResult
from .batching import BatchScheduler
from .engine import PipelineEngine
from .jobs import AdapterUse, BatchRequest, EngineResult, GenerationJob
from .residency import FuseEvent, PassMode, Residency, Tier, TierResidency
from .settings import ServeSettings
from .slots import LoraSlot

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationTask:
    """What the gateway sends a replica: resolved adapters with weights, and the job."""

    adapters: tuple[tuple[Manifest, float], ...]
    job: GenerationJob
    set_id: str
    lane: str = ""  # the caller's tenant: another tenant's pass may host it between steps ("": none)


@dataclass
class AdapterFetch:
    digest: str
    tier: Tier  # where it came from
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
    fuse_events: list[FuseEvent] = field(default_factory=list)
    resident: Residency = field(default_factory=dict)
    mode: PassMode = PassMode.base  # how the pass applied adapters
    batch_images: int = 1  # images in the pass this request shared
    cut_in: bool = False  # that pass ran between two steps of another tenant's
    replica_ms: float = 0.0  # from the replica's receiving the task to its result (fetch, wait, pass)


def load_replica_base(settings: ServeSettings):
    """The base pipeline on the configured device and dtype."""
    loaded = load_base(settings.base, base_config=settings.base_config)
    placement = resolve_placement(settings.device, settings.dtype)
    if placement.dtype != getattr(loaded.pipeline, loaded.family.denoiser).dtype:
        loaded.pipeline.to(dtype=placement.dtype)
    if placement.device.type != "cpu":
        loaded.pipeline.to(placement.device)
    return loaded, placement


class GeneratorReplica:
    def __init__(self, settings: ServeSettings, registry: AdapterRegistry | None = None):
        self.settings = settings
        self.registry = registry or AdapterRegistry(settings.registry)
        disk = DiskTier(settings.cache.disk_dir, settings.cache.disk_bytes) if settings.cache.disk_bytes else None
        self.fetcher = AdapterFetcher(self.registry, settings.cache.host_bytes, disk)
        self.replica_id = f"{socket.gethostname()}:{os.getpid()}"
        self._held_pins: dict[str, str] = {}  # name -> digest kept in the host tier
        self._active = TierResidency((), 0)
        # Every torch call of the replica, loading included, runs on the scheduler's one thread.
        # Measured on 2 cores: once a second thread that has run torch ops is alive, OpenMP's
        # workers stop spinning and every parallel region pays a futex wake-up, and the tiny
        # base generates 3x slower (0.18 s -> 0.55 s), whichever thread calls.
        # Without tenants nothing cuts in: no host, so passes skip the check at every step boundary.
        host = (lambda: self.engine) if settings.cut_in_places else None
        self.scheduler = BatchScheduler(lambda requests, between_steps: self.engine.run_batch(requests, between_steps),
                                        settings.batching.max_batch_images, settings.batching.wait_ms, host=host,
                                        wait_pass_share=settings.batching.wait_pass_share)
        self.scheduler.call(self._load_pipeline)
        self.prewarmed = self._prewarm()  # before the replica is ready (Ray routes to it once built)
        self._pins_stop = threading.Event()
        threading.Thread(target=self._keep_pins, name="lorafleet-pins", daemon=True).start()

    def _prewarm(self) -> list[str]:
        """Fetch the configured and pinned adapters, and run one 1-step pass with each so that it
        is active (device tier) if it fits; a ref that cannot be loaded is logged, not fatal."""
        pins = self._read_pins() or []
        refs = list(dict.fromkeys([*self.settings.prewarm, *(f"{p.name}@{p.version}" for p in pins)]))
        warmed = []
        for ref in refs:
            try:
                manifest = self.registry.resolve(ref)
                job = GenerationJob("warm-up", None, 1, 1.0, self.base.native_size, self.base.native_size, (0,))
                self.generate(GenerationTask(((manifest, 1.0),), job, f"prewarm-{manifest.digest}"))
                warmed.append(f"{manifest.name}@{manifest.version}")
            except LorafleetError as exc:
                logger.warning("prewarm of %s failed: %s", ref, exc)
        self._hold_pins(pins)
        return warmed

    def _read_pins(self) -> list[PinRecord] | None:
        """The registry's pins; None when it cannot be read (what is held stays held)."""
        try:
            return self.registry.pins()
        except LorafleetError as exc:
            logger.warning("reading pins failed: %s", exc)
            return None

    def _hold_pins(self, pins: list[PinRecord]) -> None:
        """Keep exactly the pinned digests in the host tier (fetching those not there yet)."""
        for pin in pins:
            if pin.digest not in self.fetcher.host.keys():
                try:
                    self.fetcher.fetch(self.registry.resolve(f"{pin.name}@{pin.version}"))
                except LorafleetError as exc:
                    logger.warning("fetching pinned %s@%s failed: %s", pin.name, pin.version, exc)
        self._held_pins = {pin.name: pin.digest for pin in pins}
        self.fetcher.host.hold(set(self._held_pins.values()))

    def _keep_pins(self) -> None:
        while not self._pins_stop.wait(self.settings.cache.pin_refresh_s):
            pins = self._read_pins()
            if pins is not None:
                self._hold_pins(pins)

    def _load_pipeline(self) -> None:
        self.base, self.placement = load_replica_base(self.settings)
        self.fetcher.base = self.base.spec()  # blobs are re-validated against it before first use
        slot = None
        if self.settings.hotswap is not None:
            slot = LoraSlot(self.base.pipeline, self.settings.hotswap.target_rank, self.settings.hotswap.compile)
        cache = self.settings.cache
        self.engine = PipelineEngine(self.base.pipeline, self.placement, cache.active_max_adapters,
                                     self.settings.fuse_after, cache.active_bytes, slot=slot,
                                     row_weights_bytes=self.settings.batching.row_weights_bytes)

    def _fetch(self, task: GenerationTask) -> tuple[list[AdapterUse], list[AdapterFetch]]:
        return self._uses(task, [self.fetcher.fetch(manifest) for manifest, _ in task.adapters])

    def _held(self, task: GenerationTask) -> tuple[list[AdapterUse], list[AdapterFetch]] | None:
        """The task's adapters if host memory holds every one (no disk or store read), else None."""
        results = [self.fetcher.held(manifest) for manifest, _ in task.adapters]
        return None if None in results else self._uses(task, results)

    def _uses(self, task: GenerationTask, results: list[FetchResult]) -> tuple[list[AdapterUse], list[AdapterFetch]]:
        uses, fetches = [], []
        for (manifest, weight), result in zip(task.adapters, results):
            active = manifest.digest in self._active.digests
            uses.append(AdapterUse(result.adapter, weight))
            fetches.append(AdapterFetch(manifest.digest, Tier.active if active else result.tier, result.seconds))
        return uses, fetches

    def _submit(self, uses: list[AdapterUse], task: GenerationTask):
        job = task.job
        cost = len(job.seeds) * job.steps * job.width * job.height
        return self.scheduler.submit(self.engine.batch_key(uses, job), BatchRequest(tuple(uses), job),
                                     len(job.seeds), task.lane, cost)

    def generate(self, task: GenerationTask) -> GenerationOutput:
        """Blocking: fetch the adapters, then wait for the pass this request joins."""
        started = time.perf_counter()
        uses, fetches = self._fetch(task)
        fetch_ms = 1000 * (time.perf_counter() - started)
        return self._output(self._submit(uses, task).result(), fetches, fetch_ms, started)

    async def generate_async(self, task: GenerationTask) -> GenerationOutput:
        """The same without holding a thread while the request waits for its pass."""
        started = time.perf_counter()
        # on the event loop what host memory holds; a disk or store read in a thread
        uses, fetches = self._held(task) or await asyncio.to_thread(self._fetch, task)
        fetch_ms = 1000 * (time.perf_counter() - started)
        result = await asyncio.wrap_future(self._submit(uses, task))
        return self._output(result, fetches, fetch_ms, started)

    def _output(self, result: EngineResult, fetches: list[AdapterFetch], fetch_ms: float,
                started: float) -> GenerationOutput:
        self._active = result.active or self._active
        return GenerationOutput(
            images=result.images, fetches=fetches, fetch_ms=fetch_ms, activate_ms=result.activate_ms,
            generation_ms=result.generation_ms, replica=self.replica_id, evicted_active=result.evicted,
            fuse_events=result.fuse_events, resident=self.resident(), mode=result.mode,
            batch_images=result.batch_images, cut_in=result.cut_in, replica_ms=1000 * (time.perf_counter() - started),
        )

    def resident(self) -> Residency:
        """Every tier; the active one as the last pass left it (a snapshot taken on the engine's
        thread: request threads never iterate the engine's state)."""
        return {Tier.active: self._active, **self.fetcher.resident()}

    def health(self) -> dict:
        return {"prewarmed": self.prewarmed, "pinned": sorted(self._held_pins),
                "base": self.base.id, "family": self.base.family.name, "base_fingerprint": self.base.fingerprint,
                "replica": self.replica_id,
                "native_size": self.base.native_size, "torch_threads": torch.get_num_threads(),
                "device": str(self.placement.device), "dtype": str(self.placement.dtype).removeprefix("torch.")}
