"""The gateway's logic, without HTTP or Ray: check a request, resolve adapters, call a replica.

Stages of one request: limits checked (422 naming the field) -> adapter refs resolved to
manifests (aliases cached for a short TTL; exact versions for good) -> compatibility with the
served base checked -> the task sent to a generator backend (routed by the adapter set) ->
images encoded.
"""

from __future__ import annotations

# Imports inside functions: PIL only to encode PNG output; the bases catalog (torch) only to read a base's family.
import asyncio
import base64
import hashlib
import io
import logging
import re
import secrets
import time
from typing import Protocol

import numpy as np

from lorafleet.errors import LorafleetError
from lorafleet.families import ModelFamily, family_named
from lorafleet.registry import AdapterRef, AdapterRegistry, Manifest
from lorafleet.registry.errors import (
    AdapterIncompatible,
    AdapterNotFound,
    IntegrityError,
    RegistryUnavailable,
    YankedVersion,
)

from .async_jobs import AsyncJobs
from .errors import Overloaded, RequestInvalid, RequestTimeout, ServiceUnavailable
from .feedback import FeedbackStore
from .jobs import GenerationJob
from .metrics import ServiceMetrics
from .output_cache import AdapterVersion, CachedOutput, OutputCache, output_key
from .replica import GenerationOutput, GenerationTask
from .residency import Residency
from .resolver import AdapterResolver, NotInMemory
from .schemas import NOT_BLANK, GenerateRequest, GenerateResponse, ResolvedAdapter, Timings, size_multiple
from .settings import RequestLimits, ServeSettings
from .tenants import OPERATOR, Caller, FairAdmission, RateLimited, Tenants, request_work
from .usage import UsageLedger

BASE_MODEL_NAME = "base"
logger = logging.getLogger(__name__)


class GeneratorBackend(Protocol):
    async def generate(self, task: GenerationTask) -> GenerationOutput: ...

    async def health(self) -> dict: ...

    def ingress(self) -> str: ...  # how HTTP reaches the gateway (serve.ingress)


def _caller_key(caller: Caller, user: str | None) -> str | None:
    """What a canary split is sticky on: the end user, within the calling tenant."""
    return f"{caller.label}\0{user}" if user is not None else None


def adapter_set_id(adapters: list[tuple[Manifest, float]]) -> str:
    """The multiplexing key of an adapter set: its digests and weights (never empty)."""
    if not adapters:
        return BASE_MODEL_NAME
    text = "|".join(f"{m.digest}*{w:.6g}" for m, w in sorted(adapters, key=lambda a: a[0].digest))
    return "set-" + hashlib.sha256(text.encode()).hexdigest()[:32]


def _family_of_base(settings: ServeSettings) -> ModelFamily:
    """The base's family as its name or files say it (for the request schema), before any replica
    has loaded it; SD 1.x if the gateway cannot read the base (a replica's health then says)."""
    from lorafleet.bases import family_of_base

    try:
        return family_of_base(settings.base)
    except LorafleetError as exc:
        logger.warning("the gateway cannot tell the family of base %r (%s); a replica will", settings.base, exc)
        return family_named("sd1")


def check_limits(request: GenerateRequest, limits: RequestLimits, native_size: int,
                 family: ModelFamily, max_num_images: int | None = None) -> tuple[int, int, int]:
    """(steps, width, height) for the request, or RequestInvalid naming the field. Sizes are multiples
    of both the configured multiple and the family's (Flux: 16)."""
    def fail(field: str, message: str):
        raise RequestInvalid(message, field=field)

    if not re.search(NOT_BLANK, request.prompt):
        fail("prompt", "prompt must not be empty")
    for field, text in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt or "")):
        if len(text) > limits.max_prompt_chars:
            fail(field, f"{field} is longer than {limits.max_prompt_chars} characters")
    steps = request.steps or limits.default_steps
    if steps > limits.max_steps:
        fail("steps", f"steps must be at most {limits.max_steps}")
    most = max(limits.max_num_images, max_num_images or 0)  # async jobs may ask for more
    if request.num_images > most:
        fail("num_images", f"num_images must be at most {most}")
    if len(request.adapter_weights()) > limits.max_adapters_per_request:
        fail("adapters", f"at most {limits.max_adapters_per_request} adapters per request")
    if (request.true_cfg_scale or 1.0) > 1.0 and not family.offers_true_cfg:
        fail("true_cfg_scale", f"true_cfg_scale is for families with a guidance embedding; {family.title} guides "
                               "with guidance_scale")
    multiple = size_multiple(limits, family)
    sizes = {"width": request.width or native_size, "height": request.height or native_size}
    for field, size in sizes.items():
        if not limits.min_size <= size <= limits.max_size or size % multiple:
            fail(field, f"{field} must be a multiple of {multiple} in [{limits.min_size}, {limits.max_size}]")
    return steps, sizes["width"], sizes["height"]


def decode_npy(image_b64: str) -> np.ndarray:
    """The exact float32 image of an ``npy`` response entry (the inverse of ``encode_image(..., "npy")``)."""
    return np.load(io.BytesIO(base64.b64decode(image_b64)), allow_pickle=False)


def encode_images(images: np.ndarray, output_format: str) -> list[str]:
    return [encode_image(image, output_format) for image in images]


INLINE_ENCODE_VALUES = 64 * 64 * 3  # up to one 64 px image: encoding it costs less than a thread hand-off


async def _encoded(images: np.ndarray, output_format: str) -> list[str]:
    """The images encoded: on the event loop when they are small, else off it."""
    if images.size <= INLINE_ENCODE_VALUES:
        return encode_images(images, output_format)
    return await asyncio.to_thread(encode_images, images, output_format)


class _Stopwatch:
    """Milliseconds per named stage of one request, and in all."""

    def __init__(self):
        self.started = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(1000 * (now - self.last), 3)
        self.last = now

    @property
    def total_ms(self) -> float:
        return 1000 * (time.perf_counter() - self.started)


def encode_image(image: np.ndarray, output_format: str) -> str:
    """One [height, width, 3] float image in [0, 1] as base64 in ``output_format``."""
    from PIL import Image

    buffer = io.BytesIO()
    if output_format == "npy":
        np.save(buffer, image.astype(np.float32), allow_pickle=False)
    else:
        pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(buffer, format={"jpeg": "JPEG", "webp": "WEBP"}.get(output_format, "PNG"))
    return base64.b64encode(buffer.getvalue()).decode()


class GenerationService:
    def __init__(self, settings: ServeSettings, backend: GeneratorBackend, registry: AdapterRegistry,
                 metrics: ServiceMetrics | None = None):
        self.settings = settings
        self.backend = backend
        self.registry = registry
        self.resolver = AdapterResolver(registry, settings.resolution_ttl_s)
        self.base_fingerprint: str | None = None  # learnt from a replica (the gateway loads no model)
        self.native_size = 512
        self.family: ModelFamily = _family_of_base(settings)  # a replica's health confirms it
        self.metrics = metrics or ServiceMetrics(UsageLedger(registry.store, settings.usage.retention_s,
                                                             settings.usage.flush_s))
        cache = settings.output_cache
        self.output_cache = OutputCache(cache.memory_bytes, cache.shared_uri, cache.shared_ttl_s, cache.shared_bytes,
                                        metrics=self.metrics)
        self._yank_checks: dict[str, tuple[bool, float]] = {}  # digest -> (still served, when checked)
        self._generating: dict[str, asyncio.Future] = {}  # output key -> the output of the request generating it
        self._in_flight = 0
        self.resident_by_replica: dict[str, Residency] = {}
        replicas = max(settings.replicas, settings.autoscaling.max_replicas if settings.autoscaling else 1)
        self._max_pending = (settings.max_queued_requests + settings.max_ongoing_requests * replicas
                             + settings.cut_in_places)
        self.tenants = Tenants(settings.tenants)
        self.jobs = AsyncJobs(registry.store, settings.async_jobs, settings.webhooks)
        self.feedback = FeedbackStore(settings.feedback.database_url) if settings.feedback.enabled else None
        # With tenants, requests wait at the gateway in one lane each, and only what the replicas can
        # hold at once goes to them: a freed place goes to the lane served least for its share.
        self.fair = (FairAdmission(settings.max_ongoing_requests * replicas, settings.cut_in_places)
                     if self.tenants.enabled else None)

    async def _resolve_async(self, request: GenerateRequest, caller: Caller,
                             user: str | None) -> list[tuple[str, Manifest, float]]:
        """On the event loop what the resolver holds; in a thread what needs the registry (a hop to a
        worker thread waits for the GIL beside a pass: some 3 ms a request under load)."""
        try:
            return self._resolve(request, caller, user, memory_only=True)
        except NotInMemory:
            return await asyncio.to_thread(self._resolve, request, caller, user)

    def _resolve(self, request: GenerateRequest, caller: Caller = OPERATOR,
                 user: str | None = None, memory_only: bool = False) -> list[tuple[str, Manifest, float]]:
        """(ref, manifest, weight) per distinct adapter; naming one adapter twice adds the weights
        (a LoRA's update is linear in its weight, so this is the same model). Another tenant's
        adapter is not found (and never looked up)."""
        merged: dict[str, tuple[str, Manifest, float]] = {}
        field_name = "adapter" if request.adapter is not None else "adapters"
        for index, item in enumerate(request.adapter_weights()):
            field = field_name if request.adapter is not None else f"adapters[{index}].ref"
            try:
                name = AdapterRef.parse(item.ref, field=field).name
                if not caller.sees(name):
                    raise AdapterNotFound(f"no adapter named {name!r}", field=field)
                manifest = self.resolver.resolve(item.ref, field, _caller_key(caller, user), memory_only=memory_only)
            except LorafleetError as exc:
                self.metrics.adapter_load_failures.labels(code=exc.code).inc()
                raise
            if manifest.base.fingerprint != self.base_fingerprint:
                raise AdapterIncompatible(
                    f"{manifest.adapter_id} was made for base {manifest.base.id} ({manifest.base.fingerprint[:19]}), "
                    f"not for the base this server runs ({self.base_fingerprint[:19]})", field=field)
            ref, _, weight = merged.get(manifest.digest, (item.ref, manifest, 0.0))
            merged[manifest.digest] = (ref, manifest, weight + item.weight)
        return list(merged.values())

    def _task(self, request: GenerateRequest, resolved, size: tuple[int, int, int],
              caller: Caller = OPERATOR) -> tuple[GenerationTask, list[int]]:
        steps, width, height = size
        seed = request.seed if request.seed is not None else int.from_bytes(np.random.bytes(4), "little")
        seeds = [(seed + i) % 2**32 for i in range(request.num_images)]
        job = GenerationJob(request.prompt, request.negative_prompt, steps, self._guidance(request), width, height,
                            tuple(seeds), true_cfg_scale=request.true_cfg_scale or 1.0)
        adapters = tuple((m, w) for _, m, w in resolved)
        lane = caller.label if self.tenants.enabled else ""  # tenants cut into each other's passes
        return GenerationTask(adapters=adapters, job=job, set_id=adapter_set_id(list(adapters)), lane=lane), seeds

    def _guidance(self, request: GenerateRequest) -> float:
        """The request's, else the server's default, else the base's family's own."""
        for value in (request.guidance_scale, self.settings.limits.default_guidance_scale):
            if value is not None:
                return value
        return self.family.default_guidance_scale

    async def ensure_base_info(self) -> None:
        if self.base_fingerprint is None:
            try:
                health = await asyncio.wait_for(self.backend.health(), timeout=self.settings.request_timeout_s)
            except asyncio.TimeoutError as exc:
                raise ServiceUnavailable("no generator replica answered yet") from exc
            self.native_size = int(health["native_size"])
            self.family = family_named(health.get("family") or "sd1")
            self.base_fingerprint = health["base_fingerprint"]

    async def generate(self, request: GenerateRequest, caller: Caller = OPERATOR,
                       user: str | None = None, async_job: bool = False) -> GenerateResponse:
        """One request; ``user`` (the request's ``user`` field, or the X-Lorafleet-User header) keeps
        an end user on one version of a canary split."""
        started = time.perf_counter()
        resolved: list = []
        try:
            response = await self._generate(request, caller, user or request.user, resolved, async_job)
        except LorafleetError:
            self.metrics.record_versions([m for _, m, _ in resolved], "error", time.perf_counter() - started)
            raise
        self.metrics.record_versions([m for _, m, _ in resolved], "ok", time.perf_counter() - started)
        if self.feedback is not None:
            response.request_id = "req-" + secrets.token_hex(12)
            self.feedback.record_request_later(response.request_id, caller.tenant,
                                               [(m.name, m.version) for _, m, _ in resolved])
        return response

    async def _generate(self, request: GenerateRequest, caller: Caller, user: str | None,
                        resolved: list, async_job: bool) -> GenerateResponse:
        clock = _Stopwatch()
        await self.ensure_base_info()
        most = self.settings.async_jobs.max_num_images if async_job else None
        size = check_limits(request, self.settings.limits, self.native_size, self.family, most)  # before the registry
        work = request_work(request.num_images, *size)
        try:
            self.tenants.admit(caller, work)  # 429 over the tenant's rates
        except RateLimited:
            self.metrics.rate_limited.labels(tenant=caller.label).inc()
            raise
        self.metrics.record_tenant_request(caller.label, request.num_images, work)
        clock.lap("checks")
        if request.adapter_weights():
            resolved[:] = await self._resolve_async(request, caller, user)
        task, seeds = self._task(request, resolved, size, caller)
        clock.lap("resolve")
        key = self._output_key(request, task, caller)
        cached = await asyncio.to_thread(self._cached_output, key) if key else None
        if cached is None and key in self._generating:  # an identical request is generating: share its output
            cached = await self._shared_output(self._generating[key])
        clock.lap("output_cache")
        if cached is not None:
            return self._response(request, task, resolved, seeds, list(cached.images), key, hit=True,
                                  timings=Timings(queue_ms=0.0, adapter_load_ms=0.0, generation_ms=0.0,
                                                  total_ms=clock.total_ms, batch_images=0, adapter_mode="cache",
                                                  breakdown=clock.laps))
        if not key:
            return await self._generate_fresh(request, task, resolved, seeds, None, clock, caller)
        shared = self._generating[key] = asyncio.get_running_loop().create_future()
        try:
            response = await self._generate_fresh(request, task, resolved, seeds, key, clock, caller)
        except asyncio.CancelledError:
            shared.cancel()  # its caller left: those waiting on it generate for themselves
            raise
        except Exception as exc:
            shared.set_exception(exc)
            shared.exception()  # retrieved here: nobody may be waiting
            raise
        finally:
            self._generating.pop(key, None)
        shared.set_result(CachedOutput(tuple(response.images), (), time.time()))
        return response

    @staticmethod
    async def _shared_output(shared: asyncio.Future) -> CachedOutput | None:
        """The output of the identical request in flight; None if that request was cancelled."""
        try:
            return await asyncio.shield(shared)
        except asyncio.CancelledError:
            if shared.cancelled():
                return None
            raise

    async def _generate_fresh(self, request: GenerateRequest, task: GenerationTask, resolved, seeds: list[int],
                              key: str | None, clock: _Stopwatch, caller: Caller = OPERATOR) -> GenerateResponse:
        output = await self._fairly(caller, task)
        clock.lap("backend")
        self.metrics.record_output(output)
        self.metrics.record_tenant_replica_time(caller.label, output.replica_ms / 1000 * len(task.job.seeds)
                                                / max(1, output.batch_images))
        self.resident_by_replica[output.replica] = output.resident
        images = await _encoded(output.images, request.output_format)
        clock.lap("encode")
        if key:
            versions = tuple(AdapterVersion(m.name, m.version, m.digest) for _, m, _ in resolved)
            await asyncio.to_thread(self._store_output, key, CachedOutput(tuple(images), versions, time.time()))
        load_ms = output.fetch_ms + output.activate_ms
        breakdown = {**clock.laps, "replica": round(output.replica_ms, 3),
                     "replica_wait": round(max(0.0, output.replica_ms - load_ms - output.generation_ms), 3)}
        timings = Timings(queue_ms=max(0.0, clock.total_ms - load_ms - output.generation_ms), adapter_load_ms=load_ms,
                          generation_ms=output.generation_ms, total_ms=clock.total_ms,
                          batch_images=output.batch_images, adapter_mode=output.mode, cut_in=output.cut_in,
                          breakdown=breakdown)
        response = self._response(request, task, resolved, seeds, images, key, hit=False, timings=timings)
        response.replica = output.replica
        return response

    @staticmethod
    def _response(request: GenerateRequest, task: GenerationTask, resolved, seeds: list[int], images: list[str],
                  key: str | None, hit: bool, timings: Timings) -> GenerateResponse:
        return GenerateResponse(
            images=images, output_format=request.output_format, width=task.job.width, height=task.job.height,
            adapters=[ResolvedAdapter(ref=ref, name=m.name, version=m.version, digest=m.digest, weight=w)
                      for ref, m, w in resolved],
            seed=seeds[0], seeds=seeds, timings=timings, cache="hit" if hit else "miss",
            etag=f'"{key}"' if key else None)

    def _output_key(self, request: GenerateRequest, task: GenerationTask, caller: Caller = OPERATOR) -> str | None:
        """The output cache's key, for a seeded request that allows caching while the cache is on;
        a tenant's outputs are never another's."""
        if request.seed is None or not request.cache or not self.settings.output_cache.enabled:
            return None
        adapters = [(manifest.digest, weight) for manifest, weight in task.adapters]
        return output_key(self.base_fingerprint, adapters, task.job, request.output_format, tenant=caller.tenant)

    def _cached_output(self, key: str) -> CachedOutput | None:
        """The cached output for ``key``, unless an adapter version it used has been yanked since."""
        found = self.output_cache.get(key)
        if found is None or self._all_still_served(found):
            return found
        self.output_cache.forget(key)
        return None

    def _store_output(self, key: str, output: CachedOutput) -> None:
        """Store an output unless a version it used is yanked (an exact pin still generates, fresh each time)."""
        if self._all_still_served(output):
            self.output_cache.put(key, output)

    def _all_still_served(self, output: CachedOutput) -> bool:
        return all(self._still_served(version) for version in output.adapters)

    def _still_served(self, version: AdapterVersion) -> bool:
        """Not yanked (nor deleted), as the registry said at most ``output_cache.recheck_s`` ago; when the
        registry cannot be reached, the last answer (or yes: the adapter is cached, as generation would use it)."""
        checked = self._yank_checks.get(version.digest)
        if checked is not None and time.monotonic() - checked[1] < self.settings.output_cache.recheck_s:
            return checked[0]
        try:
            served = not self.registry.resolve(f"{version.name}@{version.version}").yanked  # exact pins resolve yanked
        except (AdapterNotFound, YankedVersion):
            served = False
        except RegistryUnavailable:
            return checked[0] if checked is not None else True
        self._yank_checks[version.digest] = (served, time.monotonic())
        return served

    async def _fairly(self, caller: Caller, task: GenerationTask) -> GenerationOutput:
        """The backend call, after waiting for a place in the replicas' fair share (tenants only)."""
        if self.fair is None:
            return await self._call_backend(task)
        try:
            await self.fair.acquire(caller.label, self.tenants.share(caller), self.tenants.max_queued(caller))
        except RateLimited:
            self.metrics.rate_limited.labels(tenant=caller.label).inc()
            raise
        try:
            return await self._call_backend(task)
        finally:
            self.fair.release(caller.label)

    async def _call_backend(self, task: GenerationTask) -> GenerationOutput:
        if self._in_flight >= self._max_pending:
            self.metrics.overloads.inc()
            raise Overloaded("all replicas are busy and the queue is full; retry shortly")
        self._in_flight += 1
        self.metrics.queue_depth.set(self._in_flight)
        try:
            return await asyncio.wait_for(self.backend.generate(task), timeout=self.settings.request_timeout_s)
        except asyncio.TimeoutError as exc:
            raise RequestTimeout(f"generation did not finish within {self.settings.request_timeout_s:g}s") from exc
        except Overloaded:
            self.metrics.overloads.inc()
            raise
        except (IntegrityError, RegistryUnavailable) as exc:  # a replica could not fetch an adapter
            self.metrics.adapter_load_failures.labels(code=exc.code).inc()
            logger.error("adapter load failed (%s) for %s: %s", exc.code,
                         ", ".join(str(m.adapter_id) for m, _ in task.adapters), exc.message)
            raise
        finally:
            self._in_flight -= 1
            self.metrics.queue_depth.set(self._in_flight)

    def cached_tiers(self, digest: str) -> dict[str, list[str]]:
        """Replicas (last reported) holding ``digest``, by tier."""
        found: dict[str, list[str]] = {}
        for replica, tiers in self.resident_by_replica.items():
            for tier, info in tiers.items():
                if digest in info.digests:
                    found.setdefault(tier.value, []).append(replica)
        return found

    async def readiness(self) -> dict:
        try:
            health = await asyncio.wait_for(self.backend.health(), timeout=10)
            await self.ensure_base_info()
        except Exception as exc:  # any failure means: not ready
            raise ServiceUnavailable(f"no generator replica is ready: {exc}") from exc
        try:
            await asyncio.to_thread(self.registry.check)
            reachable, mode = True, "registry"
        except LorafleetError:
            reachable, mode = False, "cached-only"
        return {"status": "ready", "base": health.get("base"), "family": health.get("family"),
                "base_fingerprint": health.get("base_fingerprint"),
                "registry": self.registry.uri, "registry_reachable": reachable, "mode": mode,
                "ingress": self.backend.ingress()}
