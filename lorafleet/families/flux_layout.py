"""Black Forest Labs' original names for a diffusers ``FluxTransformer2DModel``'s modules.

BFL's Flux code (and so single-file Flux checkpoints and kohya's Flux LoRAs) fuses some layers that
diffusers keeps apart: a double block's ``img_attn.qkv`` is diffusers' ``to_q``, ``to_k`` and
``to_v`` stacked along the output axis, a single block's ``linear1`` is ``to_q, to_k, to_v,
proj_mlp``; and the final layer's modulation holds (shift, scale) where diffusers holds (scale,
shift). ``bfl_groups`` lists every Linear module as a group: one BFL module, the diffusers modules
whose outputs it stacks, in order, and whether its two output halves are swapped. The single-file
reader and writer and the kohya LoRA export (stacking a LoRA per part into one block-diagonal LoRA)
all read this one table; diffusers' own converters are the reference it was checked against.
"""

from __future__ import annotations

# Imports inside functions: torch only when tensors are converted (families are asked for names at start-up).
from dataclasses import dataclass


@dataclass(frozen=True)
class BflGroup:
    bfl: str  # e.g. "double_blocks.0.img_attn.qkv"
    parts: tuple[str, ...]  # diffusers module paths whose outputs the BFL module stacks, in order
    swap_halves: bool = False  # BFL (shift, scale) vs diffusers (scale, shift)


_TOP = (
    ("img_in", ("x_embedder",)),
    ("txt_in", ("context_embedder",)),
    ("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    ("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    ("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    ("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    ("final_layer.linear", ("proj_out",)),
)
_GUIDANCE = (
    ("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    ("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
)
_DOUBLE = (
    ("img_mod.lin", ("norm1.linear",)),
    ("txt_mod.lin", ("norm1_context.linear",)),
    ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("img_attn.proj", ("attn.to_out.0",)),
    ("txt_attn.proj", ("attn.to_add_out",)),
    ("img_mlp.0", ("ff.net.0.proj",)),
    ("img_mlp.2", ("ff.net.2",)),
    ("txt_mlp.0", ("ff_context.net.0.proj",)),
    ("txt_mlp.2", ("ff_context.net.2",)),
)
_SINGLE = (
    ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
    ("linear2", ("proj_out",)),
    ("modulation.lin", ("norm.linear",)),
)
_DOUBLE_NORMS = (("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
                 ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
                 ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
                 ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"))
_SINGLE_NORMS = (("norm.query_norm.scale", "attn.norm_q.weight"), ("norm.key_norm.scale", "attn.norm_k.weight"))


def bfl_groups(config) -> list[BflGroup]:
    """Every Linear module of a transformer with this config, as BFL groups it."""
    groups = [BflGroup(bfl, parts) for bfl, parts in _TOP]
    groups.append(BflGroup("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True))
    if config.guidance_embeds:
        groups += [BflGroup(bfl, parts) for bfl, parts in _GUIDANCE]
    for i in range(config.num_layers):
        groups += [BflGroup(f"double_blocks.{i}.{bfl}", tuple(f"transformer_blocks.{i}.{p}" for p in parts))
                   for bfl, parts in _DOUBLE]
    for i in range(config.num_single_layers):
        groups += [BflGroup(f"single_blocks.{i}.{bfl}", tuple(f"single_transformer_blocks.{i}.{p}" for p in parts))
                   for bfl, parts in _SINGLE]
    return groups


def bfl_parameter_renames(config) -> dict[str, str]:
    """BFL name -> diffusers name of every parameter outside the Linear groups (the q/k RMS norms)."""
    names = {}
    for i in range(config.num_layers):
        names.update({f"double_blocks.{i}.{bfl}": f"transformer_blocks.{i}.{ours}" for bfl, ours in _DOUBLE_NORMS})
    for i in range(config.num_single_layers):
        names.update({f"single_blocks.{i}.{bfl}": f"single_transformer_blocks.{i}.{ours}"
                      for bfl, ours in _SINGLE_NORMS})
    return names


def swap_halves(tensor):
    """(a, b) -> (b, a) along the output axis: its own inverse."""
    import torch

    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def to_bfl(state: dict, config) -> dict:
    """A diffusers transformer state dict in BFL's layout (fused layers concatenated)."""
    import torch

    out = {}
    for group in bfl_groups(config):
        for kind in ("weight", "bias"):
            parts = [state[f"{part}.{kind}"] for part in group.parts if f"{part}.{kind}" in state]
            if parts:
                fused = torch.cat(parts, dim=0)
                out[f"{group.bfl}.{kind}"] = swap_halves(fused) if group.swap_halves else fused
    for bfl, ours in bfl_parameter_renames(config).items():
        out[bfl] = state[ours]
    return out


def from_bfl(checkpoint: dict, config, out_features: dict[str, int]) -> dict:
    """The inverse of ``to_bfl``: split fused layers by each diffusers module's ``out_features``."""
    import torch

    state = {}
    for group in bfl_groups(config):
        sizes = [out_features[part] for part in group.parts]
        for kind in ("weight", "bias"):
            key = f"{group.bfl}.{kind}"
            if key not in checkpoint:
                continue
            fused = swap_halves(checkpoint[key]) if group.swap_halves else checkpoint[key]
            for part, tensor in zip(group.parts, torch.split(fused, sizes, dim=0)):
                state[f"{part}.{kind}"] = tensor.contiguous()
    for bfl, ours in bfl_parameter_renames(config).items():
        state[ours] = checkpoint[bfl]
    return state
