"""The manifest: what one published adapter version is, as typed JSON."""

from __future__ import annotations

# Imports inside functions: peft only to match a rank/alpha pattern (listing the registry must not import torch).
import math
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .identity import DIGEST_REGEX, NAME_REGEX, AdapterId

# Manifests are read back from storage anyone with write access may have touched: every read
# re-checks them. No number in a manifest may be NaN or infinite (JSON cannot carry them; a NaN
# alpha once published as null and broke listing for everyone).
_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)
MAX_MANIFEST_BYTES = 1 << 20


def _finite_everywhere(value: Any, where: str) -> Any:
    """Refuse NaN/inf anywhere inside free-form JSON (metrics, training config)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} holds a non-finite number ({value})")
    if isinstance(value, dict):
        for key, item in value.items():
            _finite_everywhere(item, f"{where}.{key}")
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _finite_everywhere(item, f"{where}[{index}]")
    return value


class AdapterMethod(str, Enum):
    lora = "lora"
    dreambooth = "dreambooth"
    qlora = "qlora"
    textual_inversion = "textual_inversion"
    full = "full"


class AdapterFormat(str, Enum):
    """How the stored blob is laid out (always safetensors)."""

    diffusers_lora = "diffusers_lora"  # keys "<component>.<module>.lora_A/B.weight"
    textual_inversion = "textual_inversion"  # keys "<token>" -> [vectors, hidden]
    full_unet = "full_unet"  # keys "<denoiser>.<parameter>" (unet. or transformer.) -> full weights; the value
    # predates transformer families and stays for stored manifests


class ComponentLora(BaseModel):
    """The LoRA configuration of one pipeline component (peft's LoraConfig essentials)."""

    model_config = _STRICT

    rank: int = Field(gt=0, description="Default LoRA rank r.")
    alpha: float = Field(description="Default lora_alpha; the update is scaled by alpha / rank.")
    target_modules: list[str] = Field(description="Module paths the adapter changes.")
    rank_pattern: dict[str, int] = Field(default_factory=dict, description="Per-module ranks.")
    alpha_pattern: dict[str, float] = Field(default_factory=dict, description="Per-module alphas.")
    use_dora: bool = False

    def rank_of(self, module: str) -> int:
        return int(_pattern_value(self.rank_pattern, module, self.rank))

    def alpha_of(self, module: str) -> float:
        return float(_pattern_value(self.alpha_pattern, module, self.alpha))

    def scale_of(self, module: str) -> float:
        """alpha / rank for ``module``: what its update is multiplied by."""
        return self.alpha_of(module) / self.rank_of(module)

    def peft_config_dict(self) -> dict[str, Any]:
        """The dict that peft's LoraConfig / diffusers' adapter metadata accept."""
        return {
            "r": self.rank,
            "lora_alpha": self.alpha,
            "target_modules": sorted(self.target_modules),
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "use_dora": self.use_dora,
            "lora_dropout": 0.0,
            "init_lora_weights": True,
        }


def _pattern_value(pattern: dict, module: str, default):
    """A rank/alpha pattern's value for ``module``, matched as peft matches it when loading."""
    if not pattern:
        return default
    from peft.utils.other import get_pattern_key

    return pattern.get(get_pattern_key(pattern.keys(), module), default)


class BaseRef(BaseModel):
    model_config = _STRICT

    id: str = Field(description="Base model id: a built-in name or the path it was loaded from.")
    fingerprint: str = Field(description="sha256 over the base's configs and weights.")


class Manifest(BaseModel):
    """One published, immutable adapter version."""

    model_config = _STRICT

    schema_version: int = 1
    name: str = Field(pattern=f"^{NAME_REGEX}$")
    version: int = Field(ge=1, lt=10**9)
    digest: str = Field(pattern=f"^{DIGEST_REGEX}$", description="sha256 of the stored safetensors blob.")
    size: int = Field(ge=0, description="Blob size in bytes.")
    format: AdapterFormat
    method: AdapterMethod
    base: BaseRef
    rank: int | None = None
    alpha: float | None = None
    target_modules: list[str] = Field(default_factory=list)
    components: dict[str, ComponentLora] = Field(
        default_factory=dict, description="LoRA config per component (unet, text_encoder)."
    )
    trigger_tokens: list[str] = Field(default_factory=list)
    training_config: dict[str, Any] | None = None
    dataset_digest: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    lineage: dict[str, str] = Field(default_factory=dict, description="Where the adapter came from beyond its "
                                    "config: the stored dataset, the training job, the tracking run ids.")
    source_format: str = Field(default="diffusers", description="Layout the file was published in.")
    num_parameters: int = 0
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    description: str = ""
    yanked: bool = False
    yanked_reason: str | None = None

    @field_validator("metrics", "training_config")
    @classmethod
    def _no_non_finite(cls, value: Any, info) -> Any:
        return _finite_everywhere(value, info.field_name)

    @property
    def adapter_id(self) -> AdapterId:
        return AdapterId(self.name, self.version, self.digest)

    def to_json_bytes(self) -> bytes:
        return self.model_dump_json(indent=2).encode()
