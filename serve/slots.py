"""A compile-safe LoRA slot: adapters are swapped by copying weights, never by changing modules.

``torch.compile`` guards on module structure and on Python attributes: injecting a peft adapter,
``set_adapters`` to a new name, or a new float scaling each recompile the UNet (about 13 s on a
small UNet here, and eager fallback after 8). The slot avoids all of them, as diffusers'
``enable_lora_hotswap`` + ``load_lora_adapter(hotswap=True)`` does, but for any adapter set:

- once, before compiling: one peft adapter named ``lf_slot`` on every Linear layer of the UNet
  and text encoder, rank ``target_rank``, alpha = rank (its scaling is 1.0 and never changes),
  up-projections zero (the slot starts as the base model);
- per swap: the set's per-layer updates (serve/routing.py's ``RoutedAdapter``: B already scaled
  by alpha/rank, then by the request's weight) are copied into the slot, stacked along the rank
  axis, the rest of the slot zeroed. Sets compose exactly (rank concatenation) up to
  ``target_rank`` in total.

The same copy runs on CPU without compile (tests), and on CUDA with ``compile`` set.
"""

from __future__ import annotations

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from lorafleet.families import family_of_pipeline
from lorafleet.registry.errors import AdapterIncompatible

from .jobs import LoraSet
from .routing import ImageAdapters, stack_layer

SLOT = "lf_slot"


def _linear_names(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


class LoraSlot:
    def __init__(self, pipe, target_rank: int, compile_denoiser: bool = False):
        self.pipe = pipe
        self.target_rank = target_rank
        self.layers: dict[str, torch.nn.Module] = {}
        family = family_of_pipeline(pipe)
        for component in family.lora_components:
            model = getattr(pipe, component)
            model.add_adapter(LoraConfig(r=target_rank, lora_alpha=target_rank, target_modules=_linear_names(model),
                                         lora_dropout=0.0, init_lora_weights=True), adapter_name=SLOT)
            self.layers.update(self._slot_layers(component, model))
        self._written: set[str] = set()
        self.current = LoraSet()  # the set in the slot: the empty set is the base model
        self.swaps = 0
        if compile_denoiser:
            getattr(pipe, family.denoiser).compile()

    @staticmethod
    def _slot_layers(component: str, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
        found = {}
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and SLOT in module.lora_A:
                module.set_adapter(SLOT)
                torch.nn.init.zeros_(module.lora_B[SLOT].weight)
                found[f"{component}.{name}"] = module
        return found

    def check(self, adapters: ImageAdapters) -> None:
        """Refuse a set the slot cannot hold (before any weight is touched)."""
        ranks: dict[str, int] = {}
        for routed, _ in adapters:
            for layer, update in routed.layers.items():
                if layer not in self.layers:
                    raise AdapterIncompatible(f"layer {layer} is not in the hot-swap slot", field="adapters")
                ranks[layer] = ranks.get(layer, 0) + update.down.shape[0]
        over = {layer: rank for layer, rank in ranks.items() if rank > self.target_rank}
        if over:
            raise AdapterIncompatible(
                f"the adapter set's rank {max(over.values())} exceeds hotswap.target_rank {self.target_rank}",
                field="adapters")

    @torch.no_grad()
    def load(self, key: LoraSet, adapters: ImageAdapters) -> bool:
        """Put ``adapters`` (with weights) in the slot; False if that set is there already."""
        if key == self.current:
            return False
        self.check(adapters)
        for layer in self._written:
            self.layers[layer].lora_B[SLOT].weight.zero_()
        written = {layer for routed, _ in adapters for layer in routed.layers}
        for layer in written:
            down, up = stack_layer(layer, [adapters])  # the set stacked along the rank axis, weights in B
            rank = down.shape[1]
            self.layers[layer].lora_A[SLOT].weight[:rank].copy_(down[0])
            self.layers[layer].lora_B[SLOT].weight[:, :rank].copy_(up[0])
        self._written = written
        self.current = key
        self.swaps += 1
        return True

    def adapter_names(self) -> set[str]:
        """Every peft adapter name in the slot components (only the slot, whatever was served)."""
        return {name for module in self.layers.values() for name in module.lora_A}
