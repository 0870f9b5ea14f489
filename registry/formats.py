"""Adapter file layouts accepted on publish, and their conversion to the one stored layout.

Stored layout (``AdapterPayload.to_bytes``) is what diffusers' ``save_lora_weights`` writes:
keys ``<component>.<module>.lora_A.weight`` / ``lora_B.weight`` and the peft LoRA config of each
component in the ``lora_adapter_metadata`` header entry, so that plain
``pipe.load_lora_weights(file)`` keeps rank and alpha. Accepted inputs:

- diffusers LoRA safetensors (config from the file's metadata or an adapter_config.json),
- peft ``save_pretrained`` folders (adapter_model.safetensors + adapter_config.json),
- ai-toolkit's diffusers-layout LoRAs (no peft config: alpha = rank, as diffusers reads them),
- kohya / A1111 LoRA (``lora_unet_*`` / ``lora_te_*`` with ``lora_down``/``lora_up``/``alpha``; Flux's
  with Black Forest Labs' names, fused qkv split exactly), and the family's other layouts (XLabs' Flux),
- textual inversion embeddings (``{token: [vectors, dim]}`` or A1111's ``emb_params``),
- a full denoiser state dict (``unet.<parameter>`` / ``transformer.<parameter>``) for full fine-tunes.
"""

from __future__ import annotations

# Imports inside functions: safetensors' torch API only when tensors are written.
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorafleet.bases.spec import BaseSpec
from lorafleet.families import ALL_LORA_COMPONENTS, FAMILIES, families_with_components, family_named
from lorafleet.families.flux_layout import swap_halves

from .errors import AdapterIncompatible, InvalidAdapter, UnsafeFormat
from .manifest import AdapterFormat, ComponentLora
from .safetensors_io import (
    PICKLE_SUFFIXES,
    AdapterLimits,
    UntrustedJsonError,
    canonical_safetensors,
    load_tensors,
    parse_untrusted_json,
)

LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry
LORAFLEET_METADATA_KEY = "lorafleet"
DIFFUSERS_LORA_KEY = re.compile(rf"^({'|'.join(ALL_LORA_COMPONENTS)})\.(.+)\.lora_([AB])\.weight$")
"""A LoRA tensor as diffusers saves it: component, module path, A (down) or B (up)."""
_ATTN_PROCESSOR_KEY = re.compile(
    rf"^({'|'.join(ALL_LORA_COMPONENTS)})\.(.+)\.(?:lora|lora_linear_layer)\.(down|up)\.weight$")
"""diffusers' older layout, which its training scripts still write through convert_state_dict_to_diffusers:
``to_q.lora.down.weight`` (UNet), ``q_proj.lora_linear_layer.up.weight`` (text encoders)."""
_PEFT_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")
_KOHYA_KEY = re.compile(r"^lora_(unet|te1|te2|te)_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_DIRECTORY_FILES = (
    "pytorch_lora_weights.safetensors",
    "adapter_model.safetensors",
    "learned_embeds.safetensors",
)


@dataclass
class AdapterPayload:
    """An adapter in the stored layout, ready to validate and serialize."""

    format: AdapterFormat
    tensors: dict[str, torch.Tensor]
    components: dict[str, ComponentLora] = field(default_factory=dict)
    trigger_tokens: list[str] = field(default_factory=list)
    source_format: str = "diffusers"
    source_metadata: dict[str, str] = field(default_factory=dict)  # header of the file read

    def lora_metadata(self) -> dict:
        flat = {}
        for component, config in sorted(self.components.items()):
            for key, value in config.peft_config_dict().items():
                flat[f"{component}.{key}"] = value
        return flat

    def to_bytes(self, extra_metadata: dict | None = None) -> bytes:
        from safetensors.torch import save

        metadata = {"format": "pt"}
        if self.components:
            metadata[LORA_METADATA_KEY] = json.dumps(self.lora_metadata(), indent=2, sort_keys=True)
        info = {"format": self.format.value, "trigger_tokens": self.trigger_tokens, **(extra_metadata or {})}
        metadata[LORAFLEET_METADATA_KEY] = json.dumps(info, sort_keys=True)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in sorted(self.tensors.items())}
        return canonical_safetensors(save(tensors, metadata=metadata))

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


def json_metadata(metadata: dict[str, str], key: str) -> dict:
    """A JSON object stored under ``key`` in safetensors metadata ({} when absent)."""
    raw = metadata.get(key)
    if not raw:
        return {}
    try:
        value = parse_untrusted_json(raw)
    except UntrustedJsonError as exc:
        raise InvalidAdapter(f"safetensors metadata {key!r} is not valid JSON ({exc})", field="path") from exc
    if not isinstance(value, dict):
        raise InvalidAdapter(f"safetensors metadata {key!r} must be a JSON object", field="path")
    return value


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
            components[component] = _patterned_config(ranks, {module: float(r) for module, r in ranks.items()})
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


@dataclass(frozen=True)
class _KohyaModule:
    """What one kohya module name means for a base: the component and the module paths whose outputs
    it stacks (one path for most; Flux's fused qkv three), and whether its output halves are swapped."""

    component: str
    paths: tuple[str, ...]
    swap_halves: bool = False

    @property
    def one_to_one(self) -> bool:
        return len(self.paths) == 1 and not self.swap_halves


def _kohya_module_table(spec: BaseSpec) -> dict[tuple[str, str], _KohyaModule]:
    """(kohya prefix, flattened name) -> module, for every base module, named as the base's family
    names them (SDXL: SGM UNet names, te1/te2; Flux: BFL names, some fused)."""
    family = family_named(spec.family)
    if not family.kohya_prefixes:
        return {}
    table = {(family.kohya_prefix(component), flat): _KohyaModule(component, (path,))
             for component, names in spec.kohya_names.items() for flat, path in names.items()}
    table.update({(family.kohya_prefix(component), flat): _KohyaModule(component, tuple(paths), swap)
                  for component, groups in spec.kohya_groups.items() for flat, (paths, swap) in groups.items()})
    return table


def check_family(components, spec: BaseSpec) -> None:
    """Refuse an adapter whose components say it was made for another model family, naming both."""
    foreign = sorted(set(components) - set(spec.lora_components))
    if not foreign:
        return
    made_for = " or ".join(f.title for f in families_with_components(components)) or "an unknown model family"
    raise AdapterIncompatible(
        f"the adapter targets {', '.join(foreign)}: it is made for {made_for}, but base {spec.id!r} is "
        f"{family_named(spec.family).title} ({', '.join(spec.lora_components)})", field="base")


def _kohya_family_check(prefixes: set[str], spec: BaseSpec) -> None:
    """A kohya file's prefixes say its family (te: one text encoder; te1/te2: SDXL; te1 alone: SDXL or Flux)."""
    family = family_named(spec.family)
    if prefixes <= {prefix for _, prefix in family.kohya_prefixes}:
        return
    made_for = " or ".join(f.title for f in FAMILIES.values() if prefixes <= {p for _, p in f.kohya_prefixes})
    raise AdapterIncompatible(
        f"the kohya LoRA's prefixes ({', '.join(f'lora_{p}_' for p in sorted(prefixes))}) say it is made for "
        f"{made_for or 'an unknown model family'}, but base {spec.id!r} is {family.title}", field="base")


def _from_kohya(tensors, spec: BaseSpec) -> AdapterPayload:
    _kohya_family_check({_KOHYA_KEY.match(k).group(1) for k in tensors}, spec)
    table = _kohya_module_table(spec)
    grouped: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    problems = []
    for key, tensor in tensors.items():
        match = _KOHYA_KEY.match(key)
        if not match:
            problems.append(f"{key}: not a kohya LoRA key")
            continue
        grouped.setdefault((match.group(1), match.group(2)), {})[match.group(3)] = tensor
    converted, alphas, ranks = {}, {}, {}
    for (prefix, flat), parts in sorted(grouped.items()):
        target = table.get((prefix, flat))
        if target is None:
            problems.append(f"lora_{prefix}_{flat}: no module of the base has this name")
            continue
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            problems.append(f"lora_{prefix}_{flat}: needs both lora_down and lora_up")
            continue
        down = parts["lora_down.weight"]
        rank = int(down.shape[0])
        alpha = float(parts["alpha"].item()) if "alpha" in parts else float(rank)
        for path, part_down, part_up in _split_kohya_up(target, down, parts["lora_up.weight"], spec):
            converted[f"{target.component}.{path}.lora_A.weight"] = part_down
            converted[f"{target.component}.{path}.lora_B.weight"] = part_up
            ranks.setdefault(target.component, {})[path] = int(part_down.shape[0])
            alphas.setdefault(target.component, {})[path] = alpha * part_down.shape[0] / rank  # the same alpha/rank
    if problems:
        raise InvalidAdapter("kohya LoRA file does not fit the base", field="path", problems=problems)
    components = {c: _patterned_config(ranks[c], alphas[c]) for c in ranks}
    return AdapterPayload(AdapterFormat.diffusers_lora, converted, components, source_format="kohya")


def _split_kohya_up(target: _KohyaModule, down: torch.Tensor, up: torch.Tensor,
                    spec: BaseSpec) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(module path, down, up) per diffusers module of a kohya module. A fused module's up-projection
    is split by output rows; each part keeps only the rank columns its rows use (a block-diagonal
    LoRA, as lorafleet's export writes, gets its parts' own ranks back), else the whole shared
    down-projection. Exact either way: the columns left out are zero in that part's rows."""
    if target.one_to_one:
        return [(target.paths[0], down, up)]
    up = swap_halves(up) if target.swap_halves else up
    sizes = [_out_features(spec, target.component, path) for path in target.paths]
    if sum(sizes) != up.shape[0]:
        raise InvalidAdapter(f"{target.paths[0]}: a fused kohya up-projection of {up.shape[0]} rows does not fit the "
                             f"base's {sum(sizes)}", field="path")
    parts = []
    for path, rows in zip(target.paths, torch.split(up, sizes, dim=0)):
        used = rows.abs().sum(dim=0) > 0
        if not used.any():
            continue  # this part's update is zero
        parts.append((path, down[used].clone(), rows[:, used].contiguous()))
    return parts


def _out_features(spec: BaseSpec, component: str, path: str) -> int:
    shape = spec.module(component, path)
    if shape is None:
        raise AdapterIncompatible(f"{component}.{path}: no module of base {spec.id!r} has this name", field="base")
    return int(shape.weight_shape[0])


def _patterned_config(ranks: dict[str, int], alphas: dict[str, float]) -> ComponentLora:
    """The most common rank/alpha as defaults, every other module in rank/alpha patterns."""
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    return ComponentLora(
        rank=rank,
        alpha=alpha,
        target_modules=sorted(ranks),
        rank_pattern={m: r for m, r in ranks.items() if r != rank},
        alpha_pattern={m: a for m, a in alphas.items() if a != alpha},
    )


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
        payload = _from_kohya({renamed[k]: t for k, t in tensors.items()}, spec)
        payload.source_format = source_format
        return payload
    if all(DIFFUSERS_LORA_KEY.match(k) or _ATTN_PROCESSOR_KEY.match(k) for k in keys):
        payload = _from_diffusers(_in_current_layout(tensors, spec), metadata, adapter_config)
        payload.trigger_tokens = list(json_metadata(metadata, LORAFLEET_METADATA_KEY).get("trigger_tokens", []))
        return payload
    if all(_PEFT_KEY.match(k) for k in keys):
        return _from_peft(tensors, adapter_config, spec)
    if all(_KOHYA_KEY.match(k) for k in keys):
        return _from_kohya(tensors, spec)
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


def to_kohya(payload: AdapterPayload, spec: BaseSpec) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The kohya/A1111 layout of a LoRA payload for ``spec``'s family, with the true alpha of every
    module (what kohya's sd-scripts write, and diffusers' kohya loader reads). A module kohya fuses
    (Flux's qkv) gets one LoRA: the parts' down-projections stacked, their scaled up-projections on
    the block diagonal, alpha = rank (exact)."""
    if payload.format != AdapterFormat.diffusers_lora:
        raise InvalidAdapter(f"only LoRA adapters export to kohya, not {payload.format.value}")
    family = family_named(spec.family)
    if not family.kohya_prefixes:
        raise InvalidAdapter(f"lorafleet has no kohya layout for {family.title}", field="format")
    by_path: dict[tuple[str, str], tuple[str, _KohyaModule]] = {}
    for (_, flat), module in _kohya_module_table(spec).items():
        for path in module.paths:
            by_path.setdefault((module.component, path), (flat, module))  # the first name of a path is kohya's own
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, _KohyaModule] = {}
    for component, config in payload.components.items():
        for path in config.target_modules:
            if (component, path) not in by_path:
                raise AdapterIncompatible(f"{component}.{path}: no module of base {spec.id!r} has this name",
                                          field="base")
            flat, module = by_path[component, path]
            name = f"lora_{family.kohya_prefix(component)}_{flat}"
            if not module.one_to_one:
                fused[name] = module
                continue
            out[f"{name}.lora_down.weight"] = payload.tensors[f"{component}.{path}.lora_A.weight"]
            out[f"{name}.lora_up.weight"] = payload.tensors[f"{component}.{path}.lora_B.weight"]
            out[f"{name}.alpha"] = torch.tensor(config.alpha_of(path))
    for name, module in fused.items():
        out.update(_fused_kohya_lora(name, module, payload, spec))
    return out, {"format": "pt", "ss_network_module": "networks.lora", "ss_base_model_version": family.name}


def _fused_kohya_lora(name: str, module: _KohyaModule, payload: AdapterPayload, spec: BaseSpec) -> dict:
    config = payload.components[module.component]
    downs, ups = [], []
    for path in module.paths:
        key = f"{module.component}.{path}.lora_"
        rows = _out_features(spec, module.component, path)
        if f"{key}A.weight" in payload.tensors:
            downs.append(payload.tensors[f"{key}A.weight"])
            ups.append(payload.tensors[f"{key}B.weight"].float() * config.scale_of(path))
        else:
            ups.append(torch.zeros(rows, 0))
    rank = sum(down.shape[0] for down in downs)
    up = torch.block_diag(*ups)
    dtype = downs[0].dtype
    return {f"{name}.lora_down.weight": torch.cat(downs).contiguous(),
            f"{name}.lora_up.weight": (swap_halves(up) if module.swap_halves else up).to(dtype).contiguous(),
            f"{name}.alpha": torch.tensor(float(rank))}


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
