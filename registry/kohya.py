"""The kohya / A1111 LoRA layout: reading it into the stored layout, and exporting to it.

Keys ``lora_<prefix>_<flattened module>.lora_down.weight`` / ``lora_up.weight`` / ``alpha``, named as
the base's family names its modules (SD 1.x: diffusers' names flattened; SDXL: SGM UNet names,
te1/te2; Flux: Black Forest Labs' names, where one kohya module can stack several diffusers
modules, such as the fused qkv, split and re-fused exactly).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lorafleet.bases.spec import BaseSpec
from lorafleet.families import FAMILIES, family_named
from lorafleet.families.flux_layout import swap_halves

from .errors import AdapterIncompatible, InvalidAdapter
from .manifest import AdapterFormat, ComponentLora
from .payload import AdapterPayload

KOHYA_KEY = re.compile(r"^lora_(unet|te1|te2|te)_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")


@dataclass(frozen=True)
class KohyaModule:
    """What one kohya module name means for a base: the component and the module paths whose outputs
    it stacks (one path for most; Flux's fused qkv three), and whether its output halves are swapped."""

    component: str
    paths: tuple[str, ...]
    swap_halves: bool = False

    @property
    def one_to_one(self) -> bool:
        return len(self.paths) == 1 and not self.swap_halves


def kohya_module_table(spec: BaseSpec) -> dict[tuple[str, str], KohyaModule]:
    """(kohya prefix, flattened name) -> module, for every base module, named as the base's family
    names them (SDXL: SGM UNet names, te1/te2; Flux: BFL names, some fused)."""
    family = family_named(spec.family)
    if not family.kohya_prefixes:
        return {}
    table = {(family.kohya_prefix(component), flat): KohyaModule(component, (path,))
             for component, names in spec.kohya_names.items() for flat, path in names.items()}
    table.update({(family.kohya_prefix(component), flat): KohyaModule(component, tuple(paths), swap)
                  for component, groups in spec.kohya_groups.items() for flat, (paths, swap) in groups.items()})
    return table


def kohya_family_check(prefixes: set[str], spec: BaseSpec) -> None:
    """A kohya file's prefixes say its family (te: one text encoder; te1/te2: SDXL; te1 alone: SDXL or Flux)."""
    family = family_named(spec.family)
    if prefixes <= {prefix for _, prefix in family.kohya_prefixes}:
        return
    made_for = " or ".join(f.title for f in FAMILIES.values() if prefixes <= {p for _, p in f.kohya_prefixes})
    raise AdapterIncompatible(
        f"the kohya LoRA's prefixes ({', '.join(f'lora_{p}_' for p in sorted(prefixes))}) say it is made for "
        f"{made_for or 'an unknown model family'}, but base {spec.id!r} is {family.title}", field="base")


def from_kohya(tensors, spec: BaseSpec) -> AdapterPayload:
    kohya_family_check({KOHYA_KEY.match(k).group(1) for k in tensors}, spec)
    table = kohya_module_table(spec)
    grouped: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    problems = []
    for key, tensor in tensors.items():
        match = KOHYA_KEY.match(key)
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
        for path, part_down, part_up in split_kohya_up(target, down, parts["lora_up.weight"], spec):
            converted[f"{target.component}.{path}.lora_A.weight"] = part_down
            converted[f"{target.component}.{path}.lora_B.weight"] = part_up
            ranks.setdefault(target.component, {})[path] = int(part_down.shape[0])
            alphas.setdefault(target.component, {})[path] = alpha * part_down.shape[0] / rank  # the same alpha/rank
    if problems:
        raise InvalidAdapter("kohya LoRA file does not fit the base", field="path", problems=problems)
    components = {c: patterned_config(ranks[c], alphas[c]) for c in ranks}
    return AdapterPayload(AdapterFormat.diffusers_lora, converted, components, source_format="kohya")


def split_kohya_up(target: KohyaModule, down: torch.Tensor, up: torch.Tensor,
                    spec: BaseSpec) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(module path, down, up) per diffusers module of a kohya module. A fused module's up-projection
    is split by output rows; each part keeps only the rank columns its rows use (a block-diagonal
    LoRA, as lorafleet's export writes, gets its parts' own ranks back), else the whole shared
    down-projection. Exact either way: the columns left out are zero in that part's rows."""
    if target.one_to_one:
        return [(target.paths[0], down, up)]
    up = swap_halves(up) if target.swap_halves else up
    sizes = [out_features(spec, target.component, path) for path in target.paths]
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


def out_features(spec: BaseSpec, component: str, path: str) -> int:
    shape = spec.module(component, path)
    if shape is None:
        raise AdapterIncompatible(f"{component}.{path}: no module of base {spec.id!r} has this name", field="base")
    return int(shape.weight_shape[0])


def patterned_config(ranks: dict[str, int], alphas: dict[str, float]) -> ComponentLora:
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
    by_path: dict[tuple[str, str], tuple[str, KohyaModule]] = {}
    for (_, flat), module in kohya_module_table(spec).items():
        for path in module.paths:
            by_path.setdefault((module.component, path), (flat, module))  # the first name of a path is kohya's own
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, KohyaModule] = {}
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
        out.update(fused_kohya_lora(name, module, payload, spec))
    return out, {"format": "pt", "ss_network_module": "networks.lora", "ss_base_model_version": family.name}


def fused_kohya_lora(name: str, module: KohyaModule, payload: AdapterPayload, spec: BaseSpec) -> dict:
    config = payload.components[module.component]
    downs, ups = [], []
    for path in module.paths:
        key = f"{module.component}.{path}.lora_"
        rows = out_features(spec, module.component, path)
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
