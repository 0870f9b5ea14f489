"""Synthetic adapters for a base: benchmarks and tests.

A synthetic LoRA has random A and B matrices (B is not zero, so it visibly changes the output),
deterministic from its seed.
"""

from __future__ import annotations

import torch

from lorafleet.bases.spec import BaseSpec
from lorafleet.families import family_named
from lorafleet.registry.manifest import AdapterFormat, ComponentLora
from lorafleet.registry.payload import AdapterPayload
from lorafleet.registry.validation import expected_lora_shapes

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _targets(spec: BaseSpec, component: str, suffixes: tuple[str, ...]) -> list[str]:
    modules = spec.modules.get(component, {})
    return sorted(path for path in modules if any(path == s or path.endswith("." + s) for s in suffixes))


def synthetic_lora(spec: BaseSpec, *, seed: int = 0, rank: int = 4, alpha: float = 4.0,
                   targets: tuple[str, ...] = DEFAULT_TARGETS, scale: float = 0.2,
                   text_encoder_targets: tuple[str, ...] = ()) -> AdapterPayload:
    """A random, non-trivial LoRA fitting ``spec``; ``scale`` sets the size of its change."""
    generator = torch.Generator().manual_seed(seed)
    tensors, components = {}, {}
    denoiser = family_named(spec.family).denoiser
    for component, suffixes in ((denoiser, targets), ("text_encoder", text_encoder_targets)):
        modules = _targets(spec, component, suffixes) if suffixes else []
        for path in modules:
            shape_a, shape_b = expected_lora_shapes(spec.modules[component][path], rank)
            tensors[f"{component}.{path}.lora_A.weight"] = torch.randn(shape_a, generator=generator) * scale
            tensors[f"{component}.{path}.lora_B.weight"] = torch.randn(shape_b, generator=generator) * scale
        if modules:
            components[component] = ComponentLora(rank=rank, alpha=alpha, target_modules=modules)
    return AdapterPayload(AdapterFormat.diffusers_lora, tensors, components, source_format="synthetic")


def synthetic_embedding(spec: BaseSpec, token: str, *, seed: int = 0, vectors: int = 1) -> AdapterPayload:
    """A textual-inversion embedding for ``token`` ([vectors, hidden])."""
    generator = torch.Generator().manual_seed(seed)
    embedding = torch.randn(vectors, spec.text_hidden_size, generator=generator) * 0.02
    return AdapterPayload(AdapterFormat.textual_inversion, {token: embedding}, trigger_tokens=[token],
                          source_format="synthetic")
