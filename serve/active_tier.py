"""The active tier: adapters injected into the pipeline as named peft layers or tokens, the set
``set_adapters`` last enabled, and the one set that may be fused into the base weights.

Entries are LRU within a count and a byte budget (``ByteBudgetLRU``); the adapters a request
needs are pinned while it is made room for. Textual-inversion tokens stay loaded only while a
request names them: a loaded token changes every prompt that spells its text. Fusing merges one
set into the base weights; leaving the fused state restores the base from pristine copies, so it
is bit-identical afterwards (diffusers' unfuse alone accumulates float error).

Injected layers stay in the module tree between passes, but a pass that does not enable them
(base, fused, routed) runs on the base layers beneath them (``beneath_peft``): a disabled or
merged peft layer still costs a Python call per forward: 9 % of a 20-step pass on ``tiny`` with
LoRA on every attention and feed-forward Linear (measured beside the plain pipeline, interleaved).

Not thread-safe: the engine calls it under its lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from peft.tuners.lora import LoraLayer

from lorafleet.families import family_of_pipeline
from lorafleet.registry.manifest import AdapterFormat

from .adapter_cache import ByteBudgetLRU
from .injection import Injected, inject, lora_modules, remove
from .jobs import AdapterUse, LoraSet
from .residency import FuseEvent, TierResidency


@dataclass
class TierChange:
    """What making adapters active did: digests injected and evicted, fuse events."""

    loaded: list[str] = field(default_factory=list)
    evicted: list[str] = field(default_factory=list)
    events: list[FuseEvent] = field(default_factory=list)


class ActiveTier:
    def __init__(self, pipe, max_items: int, max_bytes: int):
        self.pipe = pipe
        self.components = family_of_pipeline(pipe).lora_components
        self._entries: ByteBudgetLRU[Injected] = ByteBudgetLRU(max_bytes, max_items=max_items)
        self._applied: LoraSet | None = None  # what set_adapters was last given
        self._lora_enabled = True
        self.fused: LoraSet | None = None
        self._pristine: dict[torch.nn.Module, torch.Tensor] = {}  # LoRA layer -> its base weight before fusing
        self._peft_places: list[tuple[torch.nn.Module, str, LoraLayer]] | None = None  # (parent, name, layer)

    # ------------------------------------------------------------------ entries
    def ensure(self, uses: list[AdapterUse], keep_fused: LoraSet | None = None) -> TierChange:
        """Make ``uses`` active, and nothing else that changes a pass: no textual-inversion token
        they do not name, no fused set but ``keep_fused``."""
        wanted = [use.adapter.digest for use in uses]
        events = self.leave_fused() if self.fused != keep_fused else []
        change = TierChange(evicted=self._unload_tokens_except(wanted), events=events)
        with self._entries.pinned(wanted):
            for use in uses:
                if self._entries.get(use.adapter.digest) is None:
                    self._add(use, change)
        return change

    def _add(self, use: AdapterUse, change: TierChange) -> None:
        change.events += self.leave_fused()  # layers must not change under merged weights
        for digest, injected in self._entries.make_room(use.adapter.nbytes):
            self._remove(injected)
            change.evicted.append(digest)
        self._entries.insert(use.adapter.digest, inject(self.pipe, use.adapter), use.adapter.nbytes)
        self._peft_places = None
        change.loaded.append(use.adapter.digest)

    def _unload_tokens_except(self, wanted: list[str]) -> list[str]:
        unloaded = [digest for digest, injected in self._entries.items()
                    if injected.kind == AdapterFormat.textual_inversion and digest not in wanted]
        for digest in unloaded:
            self._remove(self._entries.pop(digest))
        return unloaded

    def _remove(self, injected: Injected) -> None:
        remove(self.pipe, injected)
        self._applied = None
        self._peft_places = None

    def residency(self) -> TierResidency:
        return TierResidency(tuple(self._entries.keys()), self._entries.bytes_used)

    # ------------------------------------------------------------------ the enabled set
    def apply(self, lora_set: LoraSet) -> None:
        """Run the next pass with ``lora_set`` on the injected layers (no LoRA if it is empty)."""
        if not lora_set.names:
            if self._lora_enabled and self._holds_lora():
                self.pipe.disable_lora()
                self._lora_enabled = False
            return
        if not self._lora_enabled:
            self.pipe.enable_lora()
            self._lora_enabled = True
        if self._applied != lora_set:
            self.pipe.set_adapters(list(lora_set.names), adapter_weights=list(lora_set.weights))
            self._applied = lora_set

    def holds_tokens(self) -> bool:
        """Whether a textual-inversion token is loaded (it changes every prompt spelling it)."""
        return any(injected.kind == AdapterFormat.textual_inversion for injected in self._entries.values())

    def _holds_lora(self) -> bool:
        return any(injected.kind == AdapterFormat.diffusers_lora for injected in self._entries.values())

    @contextmanager
    def beneath_peft(self) -> Iterator[None]:
        """For a pass that enables no injected layer: each peft layer's place in its parent holds
        its base layer (fused weights included) until the pass ends."""
        places = self._places_of_peft_layers()
        for parent, name, layer in places:
            parent._modules[name] = layer.get_base_layer()
        try:
            yield
        finally:
            for parent, name, layer in places:
                parent._modules[name] = layer

    def _places_of_peft_layers(self) -> list[tuple[torch.nn.Module, str, LoraLayer]]:
        if self._peft_places is None:
            self._peft_places = [
                (parent, name, child)
                for component in self.components for parent in getattr(self.pipe, component).modules()
                for name, child in parent.named_children() if isinstance(child, LoraLayer)]
        return self._peft_places

    # ------------------------------------------------------------------ the fused state
    def fuse(self, lora_set: LoraSet) -> list[FuseEvent]:
        """Merge the applied ``lora_set`` into the base weights, keeping copies to restore them."""
        modules = list(lora_modules(self.pipe, lora_set.names))
        self._pristine = {module: module.get_base_layer().weight.detach().clone() for _, module in modules}
        components = [c for c in self.components if any(component == c for component, _ in modules)]
        self.pipe.fuse_lora(components=components, adapter_names=list(lora_set.names))
        self.fused = lora_set
        return [FuseEvent.fuse]

    def leave_fused(self) -> list[FuseEvent]:
        """Restore the base weights bit-identically (nothing if no set is fused)."""
        if self.fused is None:
            return []
        self.pipe.unfuse_lora(components=list(self.components))
        with torch.no_grad():
            for module, weight in self._pristine.items():
                module.get_base_layer().weight.copy_(weight)
        self._pristine = {}
        self.fused = None
        self._applied = None
        return [FuseEvent.unfuse]
