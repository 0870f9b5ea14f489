"""What a pipeline pass is asked to do and what it reports: the contract between the replica, the
batch scheduler and the engine (serve/engine.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lorafleet.families import ModelFamily
from lorafleet.registry.manifest import AdapterFormat

from .adapter_cache import CachedAdapter
from .residency import FuseEvent, PassMode, TierResidency


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
    true_cfg_scale: float = 1.0  # families with a guidance embedding (Flux): classic CFG in a second pass


@dataclass(frozen=True)
class BatchRequest:
    uses: tuple[AdapterUse, ...]
    job: GenerationJob


def peft_name(digest: str) -> str:
    """A peft adapter name for a digest (module keys may not contain ':' or '.')."""
    return "lf_" + digest.split(":", 1)[1][:24]


@dataclass(frozen=True)
class LoraSet:
    """The LoRA adapters of a request as peft names and weights, in request order: requests
    with equal sets can run on the same injected (or fused) layers."""

    names: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()

    @classmethod
    def of(cls, uses: tuple[AdapterUse, ...] | list[AdapterUse]) -> LoraSet:
        loras = lora_uses(uses)
        return cls(tuple(peft_name(u.adapter.digest) for u in loras), tuple(float(u.weight) for u in loras))


def lora_uses(uses) -> list[AdapterUse]:
    return [use for use in uses if use.adapter.payload.format == AdapterFormat.diffusers_lora]


def loaded_uses(uses) -> list[AdapterUse]:
    """The adapters that are loaded into the pipeline rather than routed: textual inversions,
    and anything else, which loading refuses (full fine-tunes)."""
    return [use for use in uses if use.adapter.payload.format != AdapterFormat.diffusers_lora]


def shared_pass_key(uses, job: GenerationJob, family: ModelFamily) -> tuple:
    """Requests with equal keys can share one pipeline pass whatever their LoRA sets: same size
    (and so sequence length), steps, negative prompt taking part or not (as the family decides), and
    textual-inversion tokens (a loaded token changes every prompt that spells it).
    ``PipelineEngine.batch_key`` adds the LoRA set when its mode needs one."""
    loaded = sorted(use.adapter.digest for use in loaded_uses(uses))
    return job.width, job.height, job.steps, guided(job, family), tuple(loaded)


def guided(job: GenerationJob, family: ModelFamily) -> bool:
    return family.guided(job.guidance_scale, job.true_cfg_scale, job.negative_prompt)


@dataclass
class EngineResult:
    images: np.ndarray  # [n, height, width, 3] float32 in [0, 1]
    activate_ms: float
    generation_ms: float
    loaded: list[str] = field(default_factory=list)  # digests injected for this request
    evicted: list[str] = field(default_factory=list)
    fused: bool = False
    fuse_events: list[FuseEvent] = field(default_factory=list)
    mode: PassMode = PassMode.base
    batch_images: int = 1  # images in the pipeline pass this request shared
    active: TierResidency | None = None  # the active tier right after the pass (a snapshot)
    cut_in: bool = False  # its pass ran between two steps of another tenant's (serve/batching.py)
