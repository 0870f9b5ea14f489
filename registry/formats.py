"""Adapter file layouts accepted on publish, and their conversion to the one stored layout.

The stored layout is ``AdapterPayload`` (payload.py): what diffusers' ``save_lora_weights`` writes,
with each component's peft LoRA config, so plain ``pipe.load_lora_weights(file)`` keeps rank and
alpha. Accepted inputs:

- diffusers LoRA safetensors (config from the file's metadata or an adapter_config.json),
- peft ``save_pretrained`` folders (adapter_model.safetensors + adapter_config.json),
- ai-toolkit's diffusers-layout LoRAs (no peft config: alpha = rank, as diffusers reads them),
- kohya / A1111 LoRA (``lora_unet_*`` / ``lora_te_*`` with ``lora_down``/``lora_up``/``alpha``; Flux's
  with Black Forest Labs' names, fused qkv split exactly: kohya.py), and the family's other layouts
  (XLabs' Flux),
- textual inversion embeddings (``{token: [vectors, dim]}`` or A1111's ``emb_params``),
- a full denoiser state dict (``unet.<parameter>`` / ``transformer.<parameter>``) for full fine-tunes.
"""

from __future__ import annotations

# Imports inside functions: safetensors' torch API only when stored bytes are read.
import json
import math
import re
from pathlib import Path

import torch

from lorafleet.bases.spec import BaseSpec
from lorafleet.families import ALL_LORA_COMPONENTS, families_with_components, family_named

from .errors import AdapterIncompatible, InvalidAdapter, UnsafeFormat
from .kohya import KOHYA_KEY, from_kohya, patterned_config
from .manifest import AdapterFormat, ComponentLora
from .payload import LORA_METADATA_KEY, LORAFLEET_METADATA_KEY, AdapterPayload, json_metadata
from .safetensors_io import PICKLE_SUFFIXES, AdapterLimits, UntrustedJsonError, load_tensors, parse_untrusted_json

DIFFUSERS_LORA_KEY = re.compile(rf"^({'|'.join(ALL_LORA_COMPONENTS)})\.(.+)\.lora_([AB])\.weight$")
"""A LoRA tensor as diffusers saves it: component, module path, A (down) or B (up)."""
_ATTN_PROCESSOR_KEY = re.compile(
    rf"^({'|'.join(ALL_LORA_COMPONENTS)})\.(.+)\.(?:lora|lora_linear_layer)\.(down|up)\.weight$")
"""diffusers' older layout, which its training scripts still write through convert_state_dict_to_diffusers:
``to_q.lora.down.weight`` (UNet), ``q_proj.lora_linear_layer.up.weight`` (text encoders)."""
_PEFT_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")
_DIRECTORY_FILES = (
    "pytorch_lora_weights.safetensors",
    "adapter_model.safetensors",
    "learned_embeds.safetensors",
)


def find_weights_file(path: Path) -> tuple[Path, dict | None]:
    """The safetensors file to publish from ``path`` and an adapter_config.json beside it."""
    if path.is_dir():
        candidates = [path / name for name in _DIRECTORY_FILES if (path / name).is_file()]
        candidates = candidates or sorted(path.glob("*.safetensors"))
        if not candidates:
            pickled = [p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
            if pickled:
                raise UnsafeFormat(
                    f"{path} holds only pickle-based weights ({', '.join(pickled)}); refused: "
                    "convert them to .safetensors",
                    field="path",
                )
            raise InvalidAdapter(f"{path} holds no .safetensors adapter file", field="path")
        if len(candidates) > 1 and candidates[0].name not in _DIRECTORY_FILES:
            names = ", ".join(c.name for c in candidates)
            raise InvalidAdapter(f"{path} holds several .safetensors files ({names}); name one", field="path")
        weights = candidates[0]
    elif path.is_file():
        weights = path
    else:
        raise InvalidAdapter(f"{path} does not exist", field="path")
    config_file = weights.parent / "adapter_config.json"
    return weights, _read_json(config_file) if config_file.is_file() else None


def _read_json(path: Path) -> dict:
    try:
        data = parse_untrusted_json(path.read_bytes())
    except UntrustedJsonError as exc:
        raise InvalidAdapter(f"{path.name} is not valid JSON: {exc}", field="path") from exc
    if not isinstance(data, dict):
        raise InvalidAdapter(f"{path.name} must hold a JSON object", field="path")
    return data


def _lora_config_from_peft(config: dict, modules: dict[str, int], where: str) -> ComponentLora:
    """A ComponentLora from peft LoraConfig kwargs; ``modules`` maps module path -> rank found."""
    problems = [f"{where}: missing '{k}'" for k in ("r", "lora_alpha") if k not in config]
    if problems:
        raise InvalidAdapter("LoRA config is incomplete", field="path", problems=problems)
    try:
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
        rank_pattern = {str(k): int(v) for k, v in (config.get("rank_pattern") or {}).items()}
        alpha_pattern = {str(k): float(v) for k, v in (config.get("alpha_pattern") or {}).items()}
    except (TypeError, ValueError) as exc:
        raise InvalidAdapter(f"{where}: rank/alpha must be numbers", field="path") from exc
    if not all(math.isfinite(a) for a in [alpha, *alpha_pattern.values()]):
        raise InvalidAdapter(f"{where}: lora_alpha must be a finite number (NaN or infinity found)", field="path")
    return ComponentLora(
        rank=rank,
        alpha=alpha,
        target_modules=sorted(modules),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        use_dora=bool(config.get("use_dora", False)),
    )


def _ranks_by_module(keys: dict[str, torch.Tensor], pattern: re.Pattern, group: int) -> dict[str, int]:
    ranks = {}
    for key, tensor in keys.items():
        match = pattern.match(key)
        if match and match.group(group + 1) == "A" and tensor.ndim >= 2:
            ranks[match.group(group)] = int(tensor.shape[0])
    return ranks


def _from_diffusers(tensors, metadata: dict[str, str], adapter_config: dict | None) -> AdapterPayload:
    flat = json_metadata(metadata, LORA_METADATA_KEY) if metadata.get(LORA_METADATA_KEY) else None
    components = {}
    for component in ALL_LORA_COMPONENTS:
        prefix = f"{component}."
        component_keys = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not component_keys:
            continue
        ranks = _ranks_by_module({f"{component}.{k}": v for k, v in component_keys.items()}, DIFFUSERS_LORA_KEY, 2)
        if flat is not None:
            config = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        elif adapter_config is not None:
            config = adapter_config
        elif _written_by_ai_toolkit(metadata):
            components[component] = patterned_config(ranks, {module: float(r) for module, r in ranks.items()})
            continue
        else:
            raise InvalidAdapter(
                "the LoRA file carries no config (rank, alpha): without alpha its strength would "
                "silently change; publish the folder with its adapter_config.json or a file saved "
                "with diffusers' save_lora_weights(..., unet_lora_adapter_metadata=...)",
                field="path",
            )
        components[component] = _lora_config_from_peft(config, ranks, component)
    return AdapterPayload(AdapterFormat.diffusers_lora, dict(tensors), components)


def _written_by_ai_toolkit(metadata: dict[str, str]) -> bool:
    """ai-toolkit writes diffusers-layout LoRAs without a peft config; diffusers (and ai-toolkit's own
    inference) read them with alpha = rank, and so do we. Its header names it in ``software``."""
    try:
        software = parse_untrusted_json(metadata.get("software") or "{}")
    except UntrustedJsonError:
        return False
    return isinstance(software, dict) and software.get("name") == "ai-toolkit"


def _component_for_modules(modules: list[str], spec: BaseSpec) -> str:
    for component in spec.lora_components:
        if all(spec.module(component, m) is not None for m in modules):
            return component
    return family_named(spec.family).denoiser  # validation will list the modules that do not exist


def _from_peft(tensors, adapter_config: dict | None, spec: BaseSpec) -> AdapterPayload:
    if adapter_config is None:
        raise InvalidAdapter(
            "a peft adapter (base_model.model.* keys) needs its adapter_config.json beside it",
            field="path",
        )
    ranks = _ranks_by_module(tensors, _PEFT_KEY, 1)
    component = _component_for_modules(list(ranks), spec)
    renamed = {}
    for key, tensor in tensors.items():
        match = _PEFT_KEY.match(key)
        if not match:
            raise InvalidAdapter(f"unexpected key {key!r} in a peft adapter", field="path")
        renamed[f"{component}.{match.group(1)}.lora_{match.group(2)}.weight"] = tensor
    config = _lora_config_from_peft(adapter_config, ranks, "adapter_config.json")
    return AdapterPayload(AdapterFormat.diffusers_lora, renamed, {component: config}, source_format="peft")


def check_family(components, spec: BaseSpec) -> None:
    """Refuse an adapter whose components say it was made for another model family, naming both."""
    foreign = sorted(set(components) - set(spec.lora_components))
    if not foreign:
        return
    made_for = " or ".join(f.title for f in families_with_components(components)) or "an unknown model family"
    raise AdapterIncompatible(
        f"the adapter targets {', '.join(foreign)}: it is made for {made_for}, but base {spec.id!r} is "
        f"{family_named(spec.family).title} ({', '.join(spec.lora_components)})", field="base")


def embeddings_by_encoder(payload: AdapterPayload, family) -> list[tuple[str, str, torch.Tensor]]:
    """(text encoder, token, [vectors, hidden]) of a textual-inversion payload for ``family``: one
    encoder's tokens by name (SD 1.x), or one token's vectors per encoder by key (SDXL: clip_l, clip_g)."""
    if not family.embedding_keys:
        return [(family.text_encoders[0], token, tensor) for token, tensor in payload.tensors.items()]
    token = payload.trigger_tokens[0] if payload.trigger_tokens else ""
    return [(component, token, payload.tensors[key]) for component, key in family.embedding_keys
            if key in payload.tensors]


def _from_textual_inversion(tensors, weights: Path, spec: BaseSpec) -> AdapterPayload:
    keyed = {key for _, key in family_named(spec.family).embedding_keys}
    file_keys = {"clip_l", "clip_g"}  # SDXL embeddings as A1111 writes them, whatever the base
    if set(tensors) & file_keys:
        made_for = "Stable Diffusion XL (clip_l/clip_g)"
        if set(tensors) != keyed:
            raise AdapterIncompatible(f"the embedding is made for {made_for}, but base {spec.id!r} is "
                                      f"{family_named(spec.family).title}", field="base")
        token = weights.stem.lower()  # the token is the file name, as A1111 uses it
        return AdapterPayload(AdapterFormat.textual_inversion, {k: _as_matrix(t) for k, t in tensors.items()},
                              trigger_tokens=[token], source_format="textual_inversion")
    if keyed:
        raise AdapterIncompatible(f"the embedding has one text encoder's vectors (Stable Diffusion 1.x/2.x), but "
                                  f"base {spec.id!r} is {family_named(spec.family).title}: it needs "
                                  f"{', '.join(sorted(keyed))}", field="base")
    if set(tensors) == {"emb_params"}:  # A1111 embedding: the token is the file name
        tensors = {weights.stem.lower(): tensors["emb_params"]}
    embeddings = {token: _as_matrix(t) for token, t in tensors.items()}
    return AdapterPayload(
        AdapterFormat.textual_inversion, embeddings, trigger_tokens=sorted(embeddings),
        source_format="textual_inversion",
    )


def _as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.ndim == 2 else tensor.reshape(1, -1)


def _is_textual_inversion(tensors: dict[str, torch.Tensor]) -> bool:
    return 0 < len(tensors) <= 16 and all(
        t.ndim in (1, 2) and "." not in k and not k.startswith("lora_") for k, t in tensors.items()
    )


def read_adapter(path: Path, spec: BaseSpec, limits: AdapterLimits | None = None) -> AdapterPayload:
    """Read, detect and convert the adapter at ``path`` (a file or a folder)."""
    weights, adapter_config = find_weights_file(Path(path))
    tensors, metadata = load_tensors(weights, limits or AdapterLimits())
    if not tensors:
        raise InvalidAdapter(f"{weights.name} holds no tensors: the adapter would change nothing", field="path")
    payload = _convert(tensors, metadata, adapter_config, spec, weights)
    payload.source_metadata = metadata
    return payload


def _module_path(spec: BaseSpec, component: str, path: str) -> str:
    """The base's name for a module: text-encoder LoRAs are saved with or without ``text_model.``."""
    if spec.module(component, path) is None and spec.module(component, f"text_model.{path}") is not None:
        return f"text_model.{path}"
    return path


def _in_current_layout(tensors, spec: BaseSpec) -> dict[str, torch.Tensor]:
    """LoRA tensors renamed to ``<component>.<module path>.lora_{A,B}.weight`` with the base's paths."""
    renamed = {}
    for key, tensor in tensors.items():
        match = DIFFUSERS_LORA_KEY.match(key)
        if match:
            component, path, side = match.groups()
        else:
            component, path, direction = _ATTN_PROCESSOR_KEY.match(key).groups()
            side = "A" if direction == "down" else "B"
        renamed[f"{component}.{_module_path(spec, component, path)}.lora_{side}.weight"] = tensor
    return renamed


def _convert(tensors, metadata, adapter_config, spec: BaseSpec, weights: Path) -> AdapterPayload:
    keys = list(tensors)
    foreign = family_named(spec.family).foreign_lora_as_kohya(keys)
    if foreign is not None:
        renamed, source_format = foreign
        payload = from_kohya({renamed[k]: t for k, t in tensors.items()}, spec)
        payload.source_format = source_format
        return payload
    if all(DIFFUSERS_LORA_KEY.match(k) or _ATTN_PROCESSOR_KEY.match(k) for k in keys):
        payload = _from_diffusers(_in_current_layout(tensors, spec), metadata, adapter_config)
        payload.trigger_tokens = list(json_metadata(metadata, LORAFLEET_METADATA_KEY).get("trigger_tokens", []))
        return payload
    if all(_PEFT_KEY.match(k) for k in keys):
        return _from_peft(tensors, adapter_config, spec)
    if all(KOHYA_KEY.match(k) for k in keys):
        return from_kohya(tensors, spec)
    if _is_textual_inversion(tensors):
        return _from_textual_inversion(tensors, weights, spec)
    if all(k.startswith(f"{family_named(spec.family).denoiser}.") and ".lora" not in k for k in keys):
        return AdapterPayload(AdapterFormat.full_unet, dict(tensors), source_format="full_unet")
    sample = ", ".join(keys[:3])
    raise InvalidAdapter(
        f"{weights.name}: unrecognised adapter layout (first keys: {sample}); expected diffusers/peft "
        "LoRA, kohya LoRA, textual inversion or a full UNet state dict",
        field="path",
    )


def payload_from_stored(data: bytes) -> AdapterPayload:
    """Rebuild the payload from stored bytes (already digest-verified)."""
    from safetensors.torch import load

    tensors = load(data)
    header_length = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + header_length]).get("__metadata__", {})
    info = json_metadata(metadata, LORAFLEET_METADATA_KEY)
    adapter_format = AdapterFormat(info.get("format", AdapterFormat.diffusers_lora.value))
    if adapter_format == AdapterFormat.diffusers_lora:
        payload = _from_diffusers(tensors, metadata, None)
        payload.trigger_tokens = list(info.get("trigger_tokens", []))
        return payload
    return AdapterPayload(adapter_format, tensors, trigger_tokens=list(info.get("trigger_tokens", [])))
