"""Passes on injected peft layers: one adapter set per pass, enabled with ``set_adapters``.

Used for sets routing cannot apply (convolution LoRA, DoRA) and for passes with no LoRA."""

from __future__ import annotations

from ..active_tier import ActiveTier
from ..jobs import BatchRequest, LoraSet
from ..residency import PassMode
from . import PreparedPass


class PeftLayersRunner:
    def __init__(self, tier: ActiveTier):
        self.tier = tier

    def prepare(self, requests: list[BatchRequest], lora_set: LoraSet | None) -> PreparedPass:
        change = self.tier.ensure(list(requests[0].uses))
        self.tier.apply(lora_set)
        if lora_set.names:
            return PreparedPass(PassMode.active, change)
        return PreparedPass(PassMode.base, change, self.tier.beneath_peft())
