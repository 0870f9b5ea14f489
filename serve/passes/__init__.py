"""One runner per pass mode, behind one interface: a runner readies the pipeline for a batch
(serve/engine.py samples it). As peft keeps one file per LoRA variant, each mode is one file:

- ``peft_layers``: injected peft adapters enabled with ``set_adapters`` (base: none enabled);
- ``fused``: one set merged into the base weights, zero LoRA cost per step;
- ``routed``: every image its own adapters through per-row routing (serve/routing.py);
- ``slot``: the set copied into one compile-safe hot-swap slot (serve/slots.py).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ..residency import PassMode

if TYPE_CHECKING:  # the runners import torch and peft; this package's interface does not need them
    from ..active_tier import TierChange
    from ..jobs import BatchRequest, LoraSet


@dataclass
class PreparedPass:
    """A pipeline ready for one pass: its mode, what changed in the active tier, and the context
    the pass runs in (routing replaces layer forwards only within it)."""

    mode: PassMode
    change: TierChange
    context: AbstractContextManager = field(default_factory=nullcontext)


class PassRunner(Protocol):
    def prepare(self, requests: list[BatchRequest], lora_set: LoraSet | None) -> PreparedPass:
        """Ready the pipeline for ``requests``; ``lora_set`` is their common set (None: mixed)."""
        ...
