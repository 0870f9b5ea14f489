"""Validation of an adapter against its base, reporting every problem at once.

Checks that every key maps to a module of the base with a fitting shape, that the LoRA config
and the weights agree, that ranks are within limits, and that the adapter changes something.
"""

from __future__ import annotations

import torch

from lorafleet.bases.spec import BaseSpec, ModuleShape
from lorafleet.families import family_named

from .errors import AdapterIncompatible, InvalidAdapter
from .formats import DIFFUSERS_LORA_KEY, check_family, embeddings_by_encoder
from .manifest import AdapterFormat
from .payload import LORAFLEET_METADATA_KEY, AdapterPayload, json_metadata
from .safetensors_io import AdapterLimits


def expected_lora_shapes(module: ModuleShape, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """lora_A and lora_B shapes: [r, in] / [out, r] (linear), [r, in, kh, kw] / [out, r, 1, 1] (conv)."""
    if module.kind == "conv":
        out_ch, in_ch, kh, kw = module.weight_shape
        return (rank, in_ch, kh, kw), (out_ch, rank, 1, 1)
    out_features, in_features = module.weight_shape
    return (rank, in_features), (out_features, rank)


def lora_pairs(payload: AdapterPayload) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """The payload's LoRA tensors by (component, module path): {"A": down, "B": up} (other keys ignored)."""
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in payload.tensors.items():
        match = DIFFUSERS_LORA_KEY.match(key)
        if match:
            pairs.setdefault((match.group(1), match.group(2)), {})[match.group(3)] = tensor
    return pairs


def _check_lora_module(component, path, pair, spec: BaseSpec, limits: AdapterLimits) -> list[str]:
    where = f"{component}.{path}"
    module = spec.module(component, path)
    if module is None:
        return [f"{where}: the base has no linear or conv module of this name"]
    if set(pair) != {"A", "B"}:
        return [f"{where}: needs both lora_A and lora_B"]
    rank = int(pair["A"].shape[0]) if pair["A"].ndim else 0
    if not 1 <= rank <= limits.max_rank:
        return [f"{where}: rank {rank} is outside 1..{limits.max_rank}"]
    want_a, want_b = expected_lora_shapes(module, rank)
    problems = []
    if tuple(pair["A"].shape) != want_a:
        problems.append(f"{where}.lora_A: shape {tuple(pair['A'].shape)}, base needs {want_a}")
    if tuple(pair["B"].shape) != want_b:
        problems.append(f"{where}.lora_B: shape {tuple(pair['B'].shape)}, base needs {want_b}")
    return problems


def _check_lora_config(payload: AdapterPayload, pairs) -> list[str]:
    problems = []
    for component, config in payload.components.items():
        in_weights = {path for (c, path) in pairs if c == component}
        for missing in sorted(set(config.target_modules) - in_weights):
            problems.append(f"{component}.{missing}: in the LoRA config but has no weights")
        for (c, path), pair in pairs.items():
            if c == component and "A" in pair and pair["A"].ndim:
                declared = config.rank_of(path)  # patterns matched as peft matches them
                if int(pair["A"].shape[0]) != declared:
                    problems.append(f"{c}.{path}: weights have rank {pair['A'].shape[0]}, config says {declared}")
        if config.alpha <= 0 or any(a <= 0 for a in config.alpha_pattern.values()):
            problems.append(f"{component}: lora_alpha must be positive")
    for component in {c for c, _ in pairs} - set(payload.components):
        problems.append(f"{component}: weights without a LoRA config")
    return problems


def _validate_lora(payload: AdapterPayload, spec: BaseSpec, limits: AdapterLimits) -> None:
    pairs = lora_pairs(payload)
    if not pairs:
        raise InvalidAdapter("the adapter targets no module: it would change nothing", field="path")
    check_family({component for component, _ in pairs}, spec)
    problems = []
    for (component, path), pair in sorted(pairs.items()):
        problems += _check_lora_module(component, path, pair, spec, limits)
    if problems:
        raise AdapterIncompatible(
            f"adapter does not fit base {spec.id!r}, a {family_named(spec.family).title} base ({len(problems)} "
            "problems)", field="base", problems=problems
        )
    problems = _check_lora_config(payload, pairs)
    if problems:
        raise InvalidAdapter("LoRA config and weights disagree", field="path", problems=problems)
    if all(not bool(pair["B"].any()) for pair in pairs.values()):
        raise InvalidAdapter("every lora_B is zero: the adapter would change nothing", field="path")


def _validate_textual_inversion(payload: AdapterPayload, spec: BaseSpec) -> None:
    problems = []
    family = family_named(spec.family)
    if not family.textual_inversion:
        raise AdapterIncompatible(f"{family.title} pipelines load no textual-inversion embeddings", field="base")
    for token in dict.fromkeys(payload.trigger_tokens or payload.tensors):
        if not token or len(token) > 64 or any(ch.isspace() for ch in token):
            problems.append(f"{token!r}: a token must be 1-64 characters without spaces")
        if token.lower() in spec.vocabulary or f"{token.lower()}</w>" in spec.vocabulary:
            problems.append(f"{token!r}: already a token of the base's vocabulary")
    found = embeddings_by_encoder(payload, family)
    if family.embedding_keys and len(found) != len(family.embedding_keys):
        problems.append(f"needs one embedding per text encoder: {', '.join(k for _, k in family.embedding_keys)}")
    for component, token, embedding in found:
        hidden = spec.text_hidden_sizes.get(component, spec.text_hidden_size)
        if embedding.ndim != 2 or embedding.shape[-1] != hidden or embedding.shape[0] > 75:
            problems.append(f"{token!r} ({component}): embedding shape {tuple(embedding.shape)}, base needs "
                            f"[vectors<=75, {hidden}]")
    if problems:
        raise AdapterIncompatible("textual inversion does not fit the base", field="base", problems=problems)


def _validate_full_denoiser(payload: AdapterPayload, spec: BaseSpec) -> None:
    denoiser = family_named(spec.family).denoiser
    expected = spec.parameters.get(denoiser, {})
    given = {k.removeprefix(f"{denoiser}."): tuple(v.shape) for k, v in payload.tensors.items()}
    problems = [f"{k}: not a parameter of the base's {denoiser}" for k in sorted(payload.tensors)
                if k.removeprefix(f"{denoiser}.") not in expected or not k.startswith(f"{denoiser}.")]
    problems += [f"{denoiser}.{k}: missing" for k in sorted(set(expected) - set(given))]
    problems += [
        f"{denoiser}.{k}: shape {s}, base has {expected[k]}" for k, s in sorted(given.items())
        if k in expected and expected[k] != s
    ]
    if problems:
        name = {"unet": "UNet"}.get(denoiser, denoiser)
        raise AdapterIncompatible(f"full {name} weights do not fit the base", field="base", problems=problems[:50])


def check_declared_base(metadata: dict[str, str], spec: BaseSpec) -> None:
    """Refuse a file that says it was made for another base (lorafleet metadata)."""
    declared = json_metadata(metadata, LORAFLEET_METADATA_KEY).get("base_fingerprint")
    if declared and declared != spec.fingerprint:
        raise AdapterIncompatible(
            f"adapter was made for base {declared}, not for {spec.id!r} ({spec.fingerprint})", field="base"
        )


VALIDATORS = {
    AdapterFormat.diffusers_lora: lambda payload, spec, limits: _validate_lora(payload, spec, limits),
    AdapterFormat.textual_inversion: lambda payload, spec, limits: _validate_textual_inversion(payload, spec),
    AdapterFormat.full_unet: lambda payload, spec, limits: _validate_full_denoiser(payload, spec),
}


def validate_payload(payload: AdapterPayload, spec: BaseSpec, limits: AdapterLimits | None = None) -> None:
    VALIDATORS[payload.format](payload, spec, limits or AdapterLimits())
