"""Passes with one adapter set fused into the base weights: zero LoRA cost per step.

Entering fuses the set on its injected layers; leaving (serve/active_tier.py) restores the base
bit-identically."""

from __future__ import annotations

from ..active_tier import ActiveTier
from ..jobs import BatchRequest, LoraSet
from ..residency import PassMode
from . import PreparedPass


class FusedRunner:
    def __init__(self, tier: ActiveTier):
        self.tier = tier

    def prepare(self, requests: list[BatchRequest], lora_set: LoraSet | None) -> PreparedPass:
        change = self.tier.ensure(list(requests[0].uses), keep_fused=lora_set)
        if self.tier.fused is None:
            self.tier.apply(lora_set)
            change.events += self.tier.fuse(lora_set)
        return PreparedPass(PassMode.fused, change, self.tier.beneath_peft())
