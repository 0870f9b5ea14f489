"""The pipeline side of a replica: the active adapter tier, fusing, and generation.

One frozen base pipeline per replica. Adapters are injected as named peft adapters (the
"active" tier, LRU by count) and switched with ``set_adapters``; a set served steadily may be
fused into the base weights. Leaving the fused state restores the base from pristine copies,
so the base is bit-identical afterwards (diffusers' unfuse alone accumulates float error).
Everything that touches the pipeline runs under one lock; fetching adapters happens elsewhere.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from lorafleet.registry.errors import AdapterIncompatible
from lorafleet.registry.manifest import AdapterFormat

from lorafleet.accelerator import Placement, seeded_generators

from .adapter_cache import CachedAdapter

LORA_COMPONENTS = ("unet", "text_encoder")


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


@dataclass
class EngineResult:
    images: np.ndarray  # [n, height, width, 3] float32 in [0, 1]
    activate_ms: float
    generation_ms: float
    loaded: list[str] = field(default_factory=list)  # digests injected for this request
    evicted: list[str] = field(default_factory=list)
    fused: bool = False
    fuse_events: list[str] = field(default_factory=list)  # "fuse" / "unfuse"


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
                 max_active_bytes: int = 1024**3):
        self.pipe = pipeline
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

    # ------------------------------------------------------------------ generation
    def run(self, uses: list[AdapterUse], job: GenerationJob) -> EngineResult:
        with self._lock:
            started = time.perf_counter()
            loaded, evicted = self._ensure_active(uses)
            names, weights = self._lora_set(uses)
            key = (names, weights)
            events = self._leave_other_fused_state(key)
            if self._fused_key is None:
                self._apply(names, weights)
            events += self._maybe_fuse(key, names)
            activated = time.perf_counter()
            images = self._generate(job)
            done = time.perf_counter()
        return EngineResult(images, 1000 * (activated - started), 1000 * (done - activated), loaded, evicted,
                            fused=self._fused_key is not None, fuse_events=events)

    @torch.inference_mode()
    def _generate(self, job: GenerationJob) -> np.ndarray:
        output = self.pipe(
            prompt=job.prompt,
            negative_prompt=job.negative_prompt,
            num_inference_steps=job.steps,
            guidance_scale=job.guidance_scale,
            width=job.width,
            height=job.height,
            num_images_per_prompt=len(job.seeds),
            generator=seeded_generators(list(job.seeds)),
            output_type="np",
        )
        return np.asarray(output.images, dtype=np.float32)

    def leave_fused_state(self) -> bool:
        with self._lock:
            if self._fused_key is None:
                return False
            self._unfuse()
            return True
