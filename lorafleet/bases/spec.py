"""What an adapter needs to know of its base model: identity and targetable modules.

Produced by ``lorafleet.bases`` from a loaded pipeline; used here to validate adapters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LORA_COMPONENTS = ("unet", "text_encoder")
"""The pipeline components a LoRA adapter may target, named as diffusers names them."""


@dataclass(frozen=True)
class ModuleShape:
    """A module an adapter may target: its kind and the shape of its weight."""

    kind: str  # "linear" | "conv"
    weight_shape: tuple[int, ...]  # [out, in] or [out, in, kh, kw]


@dataclass(frozen=True)
class BaseSpec:
    id: str
    fingerprint: str
    modules: dict[str, dict[str, ModuleShape]]  # component -> module path -> shape
    parameters: dict[str, dict[str, tuple[int, ...]]]  # component -> parameter -> shape
    text_hidden_size: int
    vocabulary: frozenset[str] = field(default_factory=frozenset)

    def module(self, component: str, path: str) -> ModuleShape | None:
        return self.modules.get(component, {}).get(path)
