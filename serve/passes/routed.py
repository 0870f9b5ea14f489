"""Passes where every image uses its own adapters, routed per row (serve/routing.py): any mix of
sets in one pass, and nothing injected, so a cold adapter costs a tensor copy."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from lorafleet.accelerator import Placement

from ..active_tier import ActiveTier
from ..adapter_cache import ByteBudgetLRU, CachedAdapter
from ..jobs import BatchRequest, LoraSet, loaded_uses, lora_uses
from ..residency import PassMode
from ..routing import ImageAdapters, LoraRouter, RoutedAdapter, prepare_routed
from . import PreparedPass


class RoutedCopies:
    """Adapters in routing form on the accelerator, LRU within a byte budget."""

    def __init__(self, budget_bytes: int, placement: Placement):
        self.placement = placement
        self.cache: ByteBudgetLRU[RoutedAdapter] = ByteBudgetLRU(budget_bytes)

    def get(self, adapter: CachedAdapter) -> RoutedAdapter:
        """Raises NotRoutable for what the router cannot apply."""
        routed = self.cache.get(adapter.digest)
        if routed is None:
            routed = prepare_routed(adapter.digest, adapter.payload, self.placement.device, self.placement.dtype)
            self.cache.put(adapter.digest, routed, routed.nbytes)
        return routed

    def image_adapters(self, request: BatchRequest) -> ImageAdapters:
        return tuple((self.get(use.adapter), float(use.weight)) for use in lora_uses(request.uses))

    def per_image(self, requests: list[BatchRequest]) -> list[ImageAdapters]:
        """One entry per image: a request may ask for several seeds."""
        return [image for request in requests for image in [self.image_adapters(request)] * len(request.job.seeds)]


class RoutedRunner:
    def __init__(self, tier: ActiveTier, router: LoraRouter, copies: RoutedCopies):
        self.tier = tier
        self.router = router
        self.copies = copies

    def prepare(self, requests: list[BatchRequest], lora_set: LoraSet | None) -> PreparedPass:
        images = self.copies.per_image(requests)
        change = self.tier.ensure(loaded_uses(requests[0].uses))  # the batch key makes tokens uniform
        self.tier.apply(LoraSet())
        return PreparedPass(PassMode.mixed, change, self._routed_beneath_peft(images))

    @contextmanager
    def _routed_beneath_peft(self, images: list[ImageAdapters]) -> Iterator[None]:
        with self.tier.beneath_peft(), self.router.route(images):
            yield
