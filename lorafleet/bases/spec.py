"""What an adapter needs to know of its base model: identity and targetable modules.

Produced by ``lorafleet.bases`` from a loaded pipeline; used here to validate adapters.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
    text_hidden_size: int  # the first text encoder's (textual-inversion vectors)
    vocabulary: frozenset[str] = field(default_factory=frozenset)
    family: str = "sd1"  # lorafleet.families name
    kohya_names: dict[str, dict[str, str]] = field(default_factory=dict)  # component -> kohya flat name -> path
    text_hidden_sizes: dict[str, int] = field(default_factory=dict)  # text encoder -> hidden size
    kohya_groups: dict[str, dict[str, tuple[tuple[str, ...], bool]]] = field(default_factory=dict)
    # component -> kohya flat name -> (module paths it stacks, output halves swapped): Flux's fused layers

    @property
    def lora_components(self) -> tuple[str, ...]:
        """The components an adapter for this base may target, in the family's order."""
        return tuple(self.modules)

    def module(self, component: str, path: str) -> ModuleShape | None:
        return self.modules.get(component, {}).get(path)
