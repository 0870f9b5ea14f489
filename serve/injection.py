"""How an adapter enters and leaves the pipeline as named peft layers or tokens (diffusers'
loaders), for the active tier (serve/active_tier.py). Routed and slot passes never inject."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from peft.tuners.lora import LoraLayer

from lorafleet.families import family_of_pipeline
from lorafleet.registry.errors import AdapterIncompatible
from lorafleet.registry.formats import embeddings_by_encoder
from lorafleet.registry.manifest import AdapterFormat

from .adapter_cache import CachedAdapter
from .jobs import peft_name


@dataclass(frozen=True)
class Injected:
    """An adapter in the pipeline: LoRA layers (named by its digest), or textual-inversion tokens."""

    digest: str
    kind: AdapterFormat
    tokens: tuple[str, ...] = ()


def inject(pipe, adapter: CachedAdapter) -> Injected:
    kind = adapter.payload.format
    if kind == AdapterFormat.diffusers_lora:
        _inject_lora(pipe, adapter)
        return Injected(adapter.digest, kind)
    if kind == AdapterFormat.textual_inversion:
        return Injected(adapter.digest, kind, tokens=_load_tokens(pipe, adapter))
    raise AdapterIncompatible(
        f"{adapter.manifest.adapter_id} is a {kind.value} adapter; serve full fine-tunes as their own base",
        field="adapters",
    )


def remove(pipe, injected: Injected) -> None:
    if injected.kind == AdapterFormat.textual_inversion:
        for _, tokenizer, encoder in family_of_pipeline(pipe).text_pairs(pipe):
            if any(token in tokenizer.get_vocab() for token in injected.tokens):
                pipe.unload_textual_inversion(list(injected.tokens), tokenizer=tokenizer, text_encoder=encoder)
    else:
        pipe.delete_adapters([peft_name(injected.digest)])


def _inject_lora(pipe, adapter: CachedAdapter) -> None:
    payload = adapter.payload
    state = dict(payload.tensors)  # a new dict; diffusers copies values into fresh parameters
    common = dict(adapter_name=peft_name(adapter.digest), metadata=payload.lora_metadata(), _pipeline=pipe,
                  low_cpu_mem_usage=False)
    family = family_of_pipeline(pipe)
    for component in (c for c in family.lora_components if c in payload.components):
        if component == family.denoiser:
            load = getattr(pipe, f"load_lora_into_{component}")
            load(state, **{component: getattr(pipe, component)}, **common, **_no_alphas(load))
        else:
            load = pipe.load_lora_into_text_encoder
            load(state, text_encoder=getattr(pipe, component), prefix=component, **common, **_no_alphas(load))


def _no_alphas(load) -> dict:
    """The stored layout carries alpha in the metadata; loaders that also take kohya-style
    ``network_alphas`` (not SD3's transformer loader) are told there are none."""
    return {"network_alphas": None} if "network_alphas" in inspect.signature(load).parameters else {}


def _load_tokens(pipe, adapter: CachedAdapter) -> tuple[str, ...]:
    """Each token's embedding goes to its text encoder (SDXL: both), as a copy: the pipeline's
    embedding matrices never share the cache's storage."""
    family = family_of_pipeline(pipe)
    pairs = {name: (tokenizer, encoder) for name, tokenizer, encoder in family.text_pairs(pipe)}
    tokens = []
    for component, token, tensor in embeddings_by_encoder(adapter.payload, family):
        tokenizer, encoder = pairs[component]
        pipe.load_textual_inversion({token: tensor.clone()}, token=token, tokenizer=tokenizer, text_encoder=encoder)
        tokens.append(token)
    return tuple(dict.fromkeys(tokens))


def lora_modules(pipe, names: tuple[str, ...]):
    """(component, module) for every peft LoRA layer that holds one of ``names``."""
    for component in family_of_pipeline(pipe).lora_components:
        for module in getattr(pipe, component).modules():
            if isinstance(module, LoraLayer) and any(name in module.lora_A for name in names):
                yield component, module
