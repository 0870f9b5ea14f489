"""The pipeline side of a replica: batches, the adapter policy, and generation.

One frozen base pipeline per replica runs batches of requests (serve/batching.py forms them).
Each batch runs in one of three modes, chosen per batch:

- fused: one adapter set served steadily (``fuse_after`` batches in a row) is merged into the
  base weights: zero LoRA cost per step. Leaving the fused state restores the base from pristine
  copies, so it is bit-identical afterwards (diffusers' unfuse alone accumulates float error).
- mixed: every other batch with LoRA, uniform or not. Every image uses its own adapters
  through per-row routing (serve/routing.py); nothing is injected, so a cold adapter costs a
  tensor copy, not a layer injection.
- active: sets are injected as named peft adapters (the "active" tier, LRU by count and bytes)
  only to be fused, and for adapters routing cannot apply (convolution LoRA, DoRA), which then
  run one set per pass with ``set_adapters``.
- slot (``hotswap`` set, for a compiled UNet on CUDA): batches are uniform by adapter set and the
  set is copied into one compile-safe slot (serve/slots.py); no module ever changes.

Textual-inversion tokens are loaded only while a batch names them (the batch key keeps their
set uniform within a batch). Everything that touches the pipeline runs under one lock.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from lorafleet.accelerator import Placement, row_weights_budget
from lorafleet.registry.errors import AdapterIncompatible
from lorafleet.registry.formats import COMPONENTS as LORA_COMPONENTS
from lorafleet.registry.manifest import AdapterFormat

from .adapter_cache import ByteBudgetLRU, CachedAdapter
from .residency import PassMode, TierResidency
from .routing import ImageAdapters, LoraRouter, NotRoutable, RoutedAdapter, prepare_routed
from .sampler import BatchShape, ImageSpec, sample_images, uses_guidance
from .slots import LoraSlot


@dataclass(frozen=True)
class AdapterUse:
    adapter: CachedAdapter
    weight: float


@dataclass(frozen=True)
class GenerationJob:
    prompt: str
    negative_prompt: str | None
    steps: int
    guidance_scale: float
    width: int
    height: int
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class BatchRequest:
    uses: tuple[AdapterUse, ...]
    job: GenerationJob


def _not_lora(uses) -> list[AdapterUse]:
    """The adapters among ``uses`` that are not routed: textual inversions, loaded into the
    pipeline, and anything else, which loading refuses (full fine-tunes)."""
    return [use for use in uses if use.adapter.payload.format != AdapterFormat.diffusers_lora]


def batch_key(uses: list[AdapterUse] | tuple[AdapterUse, ...], job: GenerationJob) -> tuple:
    """Requests with equal keys can share one pipeline pass: same size, steps, guidance on or
    off, and textual-inversion tokens (a loaded token changes every prompt that spells it)."""
    loaded = sorted(use.adapter.digest for use in _not_lora(uses))
    return job.width, job.height, job.steps, uses_guidance(job.guidance_scale), tuple(loaded)


@dataclass
class EngineResult:
    images: np.ndarray  # [n, height, width, 3] float32 in [0, 1]
    activate_ms: float
    generation_ms: float
    loaded: list[str] = field(default_factory=list)  # digests injected for this request
    evicted: list[str] = field(default_factory=list)
    fused: bool = False
    fuse_events: list[str] = field(default_factory=list)  # "fuse" / "unfuse"
    mode: PassMode = PassMode.base
    batch_images: int = 1  # images in the pipeline pass this request shared
    active: TierResidency | None = None  # the active tier right after the pass (a snapshot)


def peft_name(digest: str) -> str:
    """A peft adapter name for a digest (module keys may not contain ':' or '.')."""
    return "lf_" + digest.split(":", 1)[1][:24]


@dataclass
class _Active:
    digest: str
    kind: AdapterFormat
    nbytes: int = 0
    components: tuple[str, ...] = ()
    tokens: tuple[str, ...] = ()


class PipelineEngine:
    def __init__(self, pipeline, placement: Placement, max_active: int = 8, fuse_after: int = 0,
                 max_active_bytes: int = 1024**3, slot: LoraSlot | None = None,
                 row_weights_bytes: int | None = None):
        self.pipe = pipeline
        self.slot = slot
        self.placement = placement
        self.max_active = max_active
        self.max_active_bytes = max_active_bytes
        self.fuse_after = fuse_after
        self.active: OrderedDict[str, _Active] = OrderedDict()
        self._lock = threading.Lock()
        self._applied: tuple | None = None  # (names, weights) given to set_adapters
        self._lora_enabled = True
        self._streak: tuple[tuple, int] = ((), 0)
        self._fused_key: tuple | None = None  # (names, weights) fused into the base
        self._pristine: dict[str, torch.Tensor] = {}
        self.router = LoraRouter(pipeline, row_weights_budget(placement, row_weights_bytes))
        self.routed: ByteBudgetLRU[RoutedAdapter] = ByteBudgetLRU(max_active_bytes)  # prepared for routing

    # ------------------------------------------------------------------ active tier
    def _inject_lora(self, adapter: CachedAdapter, name: str) -> tuple[str, ...]:
        payload = adapter.payload
        state = dict(payload.tensors)  # a new dict; diffusers copies values into fresh parameters
        metadata = payload.lora_metadata()
        components = tuple(sorted(payload.components))
        if "unet" in components:
            self.pipe.load_lora_into_unet(state, network_alphas=None, unet=self.pipe.unet, adapter_name=name,
                                          metadata=metadata, _pipeline=self.pipe, low_cpu_mem_usage=False)
        if "text_encoder" in components:
            self.pipe.load_lora_into_text_encoder(state, network_alphas=None, text_encoder=self.pipe.text_encoder,
                                                  adapter_name=name, metadata=metadata, _pipeline=self.pipe,
                                                  low_cpu_mem_usage=False)
        return components

    def _inject(self, adapter: CachedAdapter) -> _Active:
        kind = adapter.payload.format
        if kind == AdapterFormat.diffusers_lora:
            components = self._inject_lora(adapter, peft_name(adapter.digest))
            return _Active(adapter.digest, kind, adapter.nbytes, components=components)
        if kind == AdapterFormat.textual_inversion:
            tokens = tuple(adapter.payload.tensors)
            self.pipe.load_textual_inversion({t: adapter.payload.tensors[t].clone() for t in tokens} if len(tokens) == 1
                                             else [{t: adapter.payload.tensors[t].clone()} for t in tokens],
                                             token=list(tokens) if len(tokens) > 1 else tokens[0])
            return _Active(adapter.digest, kind, adapter.nbytes, tokens=tokens)
        raise AdapterIncompatible(
            f"{adapter.manifest.adapter_id} is a {kind.value} adapter; serve full fine-tunes as their own base",
            field="adapters",
        )

    def _remove(self, entry: _Active) -> None:
        if entry.kind == AdapterFormat.textual_inversion:
            self.pipe.unload_textual_inversion(list(entry.tokens))
        else:
            self.pipe.delete_adapters([peft_name(entry.digest)])
        self._applied = None

    def _ensure_active(self, uses: list[AdapterUse]) -> tuple[list[str], list[str]]:
        wanted = [use.adapter.digest for use in uses]
        loaded, evicted = [], []
        # A loaded token would change every prompt that contains its text, requested or not:
        # textual-inversion tokens are in the pipeline only while a request names them.
        for digest in [d for d, a in self.active.items() if a.kind == AdapterFormat.textual_inversion
                       and d not in wanted]:
            self._remove(self.active.pop(digest))
            evicted.append(digest)
        for use in uses:
            digest = use.adapter.digest
            if digest in self.active:
                self.active.move_to_end(digest)
                continue
            if self._fused_key is not None:
                self._unfuse()
            evicted += self._make_room(wanted, use.adapter.nbytes)
            self.active[digest] = self._inject(use.adapter)
            loaded.append(digest)
        return loaded, evicted

    def _make_room(self, wanted: list[str], incoming_bytes: int) -> list[str]:
        """Evict least recently used adapters (not in this request) until count and bytes fit."""
        evicted = []
        for old in [d for d in self.active if d not in wanted]:
            used = sum(a.nbytes for a in self.active.values())
            if len(self.active) < self.max_active and used + incoming_bytes <= self.max_active_bytes:
                break
            self._remove(self.active.pop(old))
            evicted.append(old)
        return evicted

    @property
    def active_bytes(self) -> int:
        return sum(a.nbytes for a in self.active.values())

    # ------------------------------------------------------------------ applying a set
    def _lora_set(self, uses: list[AdapterUse]) -> tuple[tuple[str, ...], tuple[float, ...]]:
        loras = [u for u in uses if u.adapter.payload.format == AdapterFormat.diffusers_lora]
        return tuple(peft_name(u.adapter.digest) for u in loras), tuple(float(u.weight) for u in loras)

    def _apply(self, names: tuple[str, ...], weights: tuple[float, ...]) -> None:
        if not names:
            if self._lora_enabled and any(a.kind == AdapterFormat.diffusers_lora for a in self.active.values()):
                self.pipe.disable_lora()
                self._lora_enabled = False
            return
        if not self._lora_enabled:
            self.pipe.enable_lora()
            self._lora_enabled = True
        if self._applied != (names, weights):
            self.pipe.set_adapters(list(names), adapter_weights=list(weights))
            self._applied = (names, weights)

    def _lora_modules(self, names: tuple[str, ...]):
        from peft.tuners.lora import LoraLayer

        for component in LORA_COMPONENTS:
            for module_name, module in getattr(self.pipe, component).named_modules():
                if isinstance(module, LoraLayer) and any(n in module.lora_A for n in names):
                    yield f"{component}.{module_name}", module

    def _fuse(self, names: tuple[str, ...]) -> None:
        self._pristine = {key: module.get_base_layer().weight.detach().clone()
                          for key, module in self._lora_modules(names)}
        components = [c for c in LORA_COMPONENTS if any(k.startswith(c + ".") for k in self._pristine)]
        self.pipe.fuse_lora(components=components, adapter_names=list(names))

    def _unfuse(self) -> None:
        """Leave the fused state; the base weights are restored bit-identically from copies."""
        self.pipe.unfuse_lora(components=list(LORA_COMPONENTS))
        modules = dict(self._lora_modules(tuple(peft_name(d) for d in self.active)))
        with torch.no_grad():
            for key, weight in self._pristine.items():
                modules[key].get_base_layer().weight.copy_(weight)
        self._pristine = {}
        self._fused_key = None
        self._applied = None

    def _leave_other_fused_state(self, key: tuple) -> list[str]:
        if self._fused_key is not None and self._fused_key != key:
            self._unfuse()
            return ["unfuse"]
        return []

    def _maybe_fuse(self, key: tuple, names: tuple[str, ...]) -> list[str]:
        streak_key, count = self._streak
        self._streak = (key, count + 1 if streak_key == key else 1)
        if self.fuse_after and names and self._fused_key is None and self._streak[1] >= self.fuse_after:
            self._fuse(names)
            self._fused_key = key
            return ["fuse"]
        return []

    # ------------------------------------------------------------------ routed (mixed) batches
    def _routed(self, adapter: CachedAdapter) -> RoutedAdapter:
        routed = self.routed.get(adapter.digest)
        if routed is None:
            routed = prepare_routed(adapter.digest, adapter.payload, self.placement.device, self.placement.dtype)
            self.routed.put(adapter.digest, routed, routed.nbytes)
        return routed

    def _image_adapters(self, request: BatchRequest) -> ImageAdapters:
        return tuple((self._routed(use.adapter), float(use.weight)) for use in request.uses
                     if use.adapter.payload.format == AdapterFormat.diffusers_lora)

    # ------------------------------------------------------------------ policy
    def _on_peft_layers(self, key: tuple) -> bool:
        """Whether a uniform batch runs on peft's layers: only to fuse (or while fused).

        Measured (`lorafleet bench serve`, pass_s_*): an 8-image pass routed per row costs less
        than the same pass on injected peft layers (small: 2.40 vs 2.82 s; tiny: 0.39 vs 0.43 s),
        and routing needs no injection (3.5% of a generation, plus memory peft keeps per load).
        So sets are injected only to be fused.
        """
        names, _ = key
        if not names or key == self._fused_key:
            return True
        streak = self._streak[1] if self._streak[0] == key else 0
        return bool(self.fuse_after) and streak + 1 >= self.fuse_after

    def batch_key(self, uses: list[AdapterUse] | tuple[AdapterUse, ...], job: GenerationJob) -> tuple:
        """``batch_key``, plus the LoRA set when a slot holds one set at a time."""
        key = batch_key(uses, job)
        return key + self._lora_set(list(uses)) if self.slot is not None else key

    # ------------------------------------------------------------------ generation
    def run(self, uses: list[AdapterUse], job: GenerationJob) -> EngineResult:
        return self.run_batch([BatchRequest(tuple(uses), job)])[0]

    def run_batch(self, requests: list[BatchRequest]) -> list[EngineResult]:
        """Generate every request's images in one pipeline pass (requests share ``batch_key``)."""
        keys = [self._lora_set(list(request.uses)) for request in requests]
        with self._lock:
            if self.slot is not None:
                return self._run_in_slot(requests, keys[0])
            if len(set(keys)) == 1 and self._on_peft_layers(keys[0]):
                return self._run_on_active(requests, keys[0])
            try:
                return self._run_routed(requests, keys[0] if len(set(keys)) == 1 else None)
            except NotRoutable:
                return self._run_each_set_alone(requests, keys)

    def _run_each_set_alone(self, requests: list[BatchRequest], keys: list[tuple]) -> list[EngineResult]:
        results: list[EngineResult | None] = [None] * len(requests)
        for key in dict.fromkeys(keys):
            indices = [i for i, k in enumerate(keys) if k == key]
            for index, result in zip(indices, self._run_on_active([requests[i] for i in indices], key)):
                results[index] = result
        return results

    def _run_on_active(self, requests: list[BatchRequest], key: tuple) -> list[EngineResult]:
        started = time.perf_counter()
        loaded, evicted = self._ensure_active(list(requests[0].uses))
        names, weights = key
        events = self._leave_other_fused_state(key)
        if self._fused_key is None:
            self._apply(names, weights)
        events += self._maybe_fuse(key, names)
        mode = PassMode.fused if self._fused_key is not None else (PassMode.active if names else PassMode.base)
        return self._sample(requests, started, mode, loaded, evicted, events)

    def _run_routed(self, requests: list[BatchRequest], uniform_key: tuple | None) -> list[EngineResult]:
        started = time.perf_counter()
        images = [adapters for request in requests for adapters in
                  [self._image_adapters(request)] * len(request.job.seeds)]
        events = ["unfuse"] if self._fused_key is not None else []
        if events:
            self._unfuse()
        loaded, evicted = self._ensure_active(_not_lora(requests[0].uses))
        self._apply((), ())
        if uniform_key is None:
            self._streak = ((), 0)
        else:
            self._streak = (uniform_key, self._streak[1] + 1 if self._streak[0] == uniform_key else 1)
        with self.router.route(images):
            return self._sample(requests, started, PassMode.mixed, loaded, evicted, events)

    def _run_in_slot(self, requests: list[BatchRequest], key: tuple) -> list[EngineResult]:
        started = time.perf_counter()
        self.slot.load(key, self._image_adapters(requests[0]))  # the batch key makes the set uniform
        loaded, evicted = self._ensure_active(_not_lora(requests[0].uses))
        return self._sample(requests, started, PassMode.slot, loaded, evicted, [])

    def _sample(self, requests: list[BatchRequest], started: float, mode: PassMode, loaded: list[str],
                evicted: list[str], events: list[str]) -> list[EngineResult]:
        activated = time.perf_counter()
        first = requests[0].job
        shape = BatchShape(first.width, first.height, first.steps, uses_guidance(first.guidance_scale))
        specs = [ImageSpec(r.job.prompt, r.job.negative_prompt, r.job.guidance_scale, seed)
                 for r in requests for seed in r.job.seeds]
        images = sample_images(self.pipe, shape, specs)
        done = time.perf_counter()
        active = self.active_residency()  # taken on the engine's thread: readers never iterate a changing dict
        results, offset = [], 0
        for index, request in enumerate(requests):
            count = len(request.job.seeds)
            first = index == 0  # the pass's own events are reported once, with its first request
            results.append(EngineResult(
                images[offset:offset + count], 1000 * (activated - started), 1000 * (done - activated),
                loaded if first else [], evicted if first else [], fused=mode == PassMode.fused,
                fuse_events=events if first else [], mode=mode, batch_images=len(specs), active=active))
            offset += count
        return results

    def active_residency(self) -> TierResidency:
        """The active tier now; call on the engine's thread (or hold its lock)."""
        return TierResidency(tuple(self.active), self.active_bytes)

    def leave_fused_state(self) -> bool:
        with self._lock:
            if self._fused_key is None:
                return False
            self._unfuse()
            return True
