"""Passes through the compile-safe hot-swap slot (serve/slots.py): batches are uniform by adapter
set (the engine's batch key says so), the set is copied into the slot, no module ever changes."""

from __future__ import annotations

from ..active_tier import ActiveTier
from ..jobs import BatchRequest, LoraSet, loaded_uses
from ..residency import PassMode
from ..slots import LoraSlot
from . import PreparedPass
from .routed import RoutedCopies


class SlotRunner:
    def __init__(self, tier: ActiveTier, slot: LoraSlot, copies: RoutedCopies):
        self.tier = tier
        self.slot = slot
        self.copies = copies

    def prepare(self, requests: list[BatchRequest], lora_set: LoraSet | None) -> PreparedPass:
        self.slot.load(lora_set, self.copies.image_adapters(requests[0]))
        change = self.tier.ensure(loaded_uses(requests[0].uses))
        return PreparedPass(PassMode.slot, change)
