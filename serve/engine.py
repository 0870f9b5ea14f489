"""The pipeline side of a replica: one frozen base pipeline runs batches of requests
(serve/batching.py forms them), each in the mode the fuse policy decides for it.

The engine composes the parts and holds the lock everything that touches the pipeline runs
under:

- ``ActiveTier`` (serve/active_tier.py): injected adapters, the enabled set, the fused set;
- ``FusePolicy`` (serve/fuse_policy.py): which mode a batch runs in, from the batches before;
- one runner per mode (serve/passes/): peft layers (and base), fused, routed, slot;
- ``sample_images`` (serve/sampler.py): the pass itself, then one result per request.

Between two denoising steps of a pass, another short pass may run (``run_between_steps``: the
scheduler lets a tenant's request cut in rather than wait for a whole pass of another's).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

from lorafleet.accelerator import Placement, row_weights_budget
from lorafleet.families import family_of_pipeline

from .active_tier import ActiveTier, TierChange
from .fuse_policy import FusePolicy
from .jobs import BatchRequest, EngineResult, GenerationJob, LoraSet, guided, loaded_uses, shared_pass_key
from .passes import PassRunner, PreparedPass
from .passes.fused import FusedRunner
from .passes.peft_layers import PeftLayersRunner
from .passes.routed import RoutedCopies, RoutedRunner
from .passes.slot import SlotRunner
from .residency import PassMode
from .routing import LoraRouter, NotRoutable
from .sampler import BatchShape, ImageSpec, sample_images
from .slots import LoraSlot


class PipelineEngine:
    def __init__(self, pipeline, placement: Placement, max_active: int = 8, fuse_after: int = 0,
                 max_active_bytes: int = 1024**3, slot: LoraSlot | None = None,
                 row_weights_bytes: int | None = None):
        self.pipe = pipeline
        self.placement = placement
        self.family = family_of_pipeline(pipeline)
        self.slot = slot
        self.tier = ActiveTier(pipeline, max_active, max_active_bytes)
        self.policy = FusePolicy(fuse_after)
        self.router = LoraRouter(pipeline, row_weights_budget(placement, row_weights_bytes))
        self.routed = RoutedCopies(max_active_bytes, placement)  # same budget as the injected tier
        on_layers = PeftLayersRunner(self.tier)
        self._runners: dict[PassMode, PassRunner] = {
            PassMode.base: on_layers, PassMode.active: on_layers, PassMode.fused: FusedRunner(self.tier),
            PassMode.mixed: RoutedRunner(self.tier, self.router, self.routed),
        }
        if slot is not None:
            self._runners[PassMode.slot] = SlotRunner(self.tier, slot, self.routed)
        self._lock = threading.Lock()
        self._hosting: PassMode | None = None  # the mode of the pass under way
        self._spare = None  # a scheduler for passes run between another's steps

    def batch_key(self, uses, job: GenerationJob) -> tuple:
        """Requests with equal keys share one pass: ``shared_pass_key``, plus the LoRA set when a
        slot holds one set at a time."""
        key = shared_pass_key(uses, job, self.family)
        return key + (LoraSet.of(uses),) if self.slot is not None else key

    def run_batch(self, requests: list[BatchRequest],
                  between_steps: Callable[[], None] | None = None) -> list[EngineResult]:
        """Generate every request's images in one pipeline pass (requests share ``batch_key``);
        ``between_steps`` is called at every step boundary (``run_between_steps``)."""
        sets = [LoraSet.of(request.uses) for request in requests]
        uniform = sets[0] if len(set(sets)) == 1 else None
        with self._lock:
            if self.slot is not None:
                return self._run(PassMode.slot, requests, uniform, between_steps)
            try:
                return self._run(self.policy.decide(uniform, self.tier.fused), requests, uniform, between_steps)
            except NotRoutable:
                return self._run_each_set_alone(requests, sets, between_steps)

    def can_run_between_steps(self, requests: list[BatchRequest]) -> bool:
        """Whether ``requests`` can run between two denoising steps of the pass under way (called
        from its ``between_steps``) and leave it as it was: that pass runs on the base or routed
        per row with no token loaded, and they need nothing injected."""
        if self._hosting not in (PassMode.base, PassMode.mixed) or self.tier.fused or self.tier.holds_tokens():
            return False
        if any(loaded_uses(request.uses) for request in requests):
            return False
        try:
            self.routed.per_image(requests)
        except NotRoutable:
            return False
        return True

    def run_between_steps(self, requests: list[BatchRequest]) -> list[EngineResult]:
        """Run ``requests`` (``can_run_between_steps``) as a pass of their own, routed, on a
        scheduler of their own, with the hosting pass's routing suspended."""
        started = time.perf_counter()
        images = self.routed.per_image(requests)
        mode = PassMode.mixed if any(images) else PassMode.base
        with self.router.suspended(), self._spare_scheduler():
            return self._sample(requests, PreparedPass(mode, TierChange(), self.router.route(images)), started,
                                cut_in=True)

    @contextmanager
    def _spare_scheduler(self):
        """The hosting pass's scheduler keeps its state (timesteps, step index) while another pass
        runs on a spare of the same configuration."""
        hosting = self.pipe.scheduler
        if type(self._spare) is not type(hosting):
            self._spare = type(hosting).from_config(hosting.config)
        # Set on the instance: DiffusionPipeline.__setattr__ would rewrite its config each time.
        object.__setattr__(self.pipe, "scheduler", self._spare)
        try:
            yield
        finally:
            object.__setattr__(self.pipe, "scheduler", hosting)

    def _run_each_set_alone(self, requests: list[BatchRequest], sets: list[LoraSet],
                            between_steps: Callable[[], None] | None) -> list[EngineResult]:
        results: list[EngineResult | None] = [None] * len(requests)
        for lora_set in dict.fromkeys(sets):
            indices = [i for i, s in enumerate(sets) if s == lora_set]
            mode = self.policy.decide(lora_set, self.tier.fused, routable=False)
            for index, result in zip(indices, self._run(mode, [requests[i] for i in indices], lora_set,
                                                        between_steps)):
                results[index] = result
        return results

    def _run(self, mode: PassMode, requests: list[BatchRequest], lora_set: LoraSet | None,
             between_steps: Callable[[], None] | None = None) -> list[EngineResult]:
        started = time.perf_counter()
        prepared = self._runners[mode].prepare(requests, lora_set)
        self._hosting = prepared.mode
        try:
            return self._sample(requests, prepared, started, between_steps)
        finally:
            self._hosting = None

    def _sample(self, requests: list[BatchRequest], prepared: PreparedPass, started: float,
                between_steps: Callable[[], None] | None = None, cut_in: bool = False) -> list[EngineResult]:
        activated = time.perf_counter()
        first = requests[0].job
        shape = BatchShape(first.width, first.height, first.steps, guided(first, self.family))
        specs = [ImageSpec(r.job.prompt, r.job.negative_prompt, r.job.guidance_scale, seed, r.job.true_cfg_scale)
                 for r in requests for seed in r.job.seeds]
        with prepared.context:
            images = sample_images(self.pipe, shape, specs, between_steps, self.placement.device)
        timings = (1000 * (activated - started), 1000 * (time.perf_counter() - activated))
        return self._results(requests, prepared, images, timings, cut_in)

    def _results(self, requests: list[BatchRequest], prepared: PreparedPass, images,
                 timings: tuple[float, float], cut_in: bool) -> list[EngineResult]:
        """One result per request; the pass's own changes are reported once, with the first."""
        active = self.tier.residency()  # a snapshot taken under the lock: readers never see it change
        change, results, offset = prepared.change, [], 0
        for index, request in enumerate(requests):
            count, first = len(request.job.seeds), index == 0
            results.append(EngineResult(
                images[offset:offset + count], *timings, loaded=change.loaded if first else [],
                evicted=change.evicted if first else [], fused=prepared.mode == PassMode.fused,
                fuse_events=change.events if first else [], mode=prepared.mode, batch_images=len(images),
                active=active, cut_in=cut_in))
            offset += count
        return results
