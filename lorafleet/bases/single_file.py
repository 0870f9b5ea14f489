"""Writing a base as one original-layout (LDM / A1111) .safetensors checkpoint.

Real Stable Diffusion 1.x checkpoints are distributed this way; lorafleet loads them with
diffusers' ``from_single_file`` (configs from a diffusers directory, offline). This writer
exists so that path is tested on weights we build ourselves: it maps diffusers module names
back to the LDM ones (the inverse of diffusers' conversion) for the UNet, VAE and CLIP.
"""

from __future__ import annotations

# Imports inside functions: safetensors' torch API only when a checkpoint is read or written.
from pathlib import Path

import torch

from lorafleet.errors import BaseModelError
from lorafleet.families import family_of_pipeline

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."

_UNET_FIXED = {
    "time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
}
_UNET_RESNET = {"norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "time_emb_proj.": "emb_layers.1.",
                "norm2.": "out_layers.0.", "conv2.": "out_layers.3.", "conv_shortcut.": "skip_connection."}
_VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


def _unet_block_prefixes(config) -> dict[str, str]:
    """diffusers block prefix -> LDM block prefix, for this UNet's depth and layers per block."""
    per_block, levels = config.layers_per_block, len(config.block_out_channels)
    mapping = {"mid_block.attentions.0.": "middle_block.1."}
    for j in range(2):
        mapping[f"mid_block.resnets.{j}."] = f"middle_block.{2 * j}."
    for i in range(levels):
        for j in range(per_block):
            index = (per_block + 1) * i + j + 1
            mapping[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{index}.0."
            mapping[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{index}.1."
        if i < levels - 1:
            mapping[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(per_block + 1) * (i + 1)}.0.op."
        has_attention = "CrossAttn" in config.up_block_types[i]
        for j in range(per_block + 1):
            index = (per_block + 1) * i + j
            mapping[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{index}.0."
            mapping[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{index}.1."
        if i < levels - 1:
            slot = 2 if has_attention else 1
            mapping[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{(per_block + 1) * i + per_block}.{slot}."
    return mapping


def _rename(key: str, table: dict[str, str], inner: dict[str, str] | None = None) -> str | None:
    """Replace the first matching prefix; ``inner`` renames what follows it."""
    for old, new in table.items():
        if key.startswith(old):
            rest = key[len(old):]
            return new + ((_rename(rest, inner) or rest) if inner else rest)
    return None


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    blocks = _unet_block_prefixes(unet.config)
    resnets = {k: v for k, v in blocks.items() if ".resnets." in k}
    others = {k: v for k, v in blocks.items() if ".resnets." not in k}
    out = {}
    for key, tensor in unet.state_dict().items():
        renamed = _rename(key, _UNET_FIXED) or _rename(key, resnets, _UNET_RESNET) or _rename(key, others)
        if renamed is None:
            raise ValueError(f"no LDM name for UNet parameter {key}")
        out[UNET_PREFIX + renamed] = tensor
    return out


def _vae_block_prefixes(config) -> dict[str, str]:
    levels = len(config.block_out_channels)
    mapping = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out."}
    for side in ("encoder", "decoder"):
        mapping[f"{side}.mid_block.attentions.0."] = f"{side}.mid.attn_1."
        for j in range(2):
            mapping[f"{side}.mid_block.resnets.{j}."] = f"{side}.mid.block_{j + 1}."
    for i in range(levels):
        mapping[f"encoder.down_blocks.{i}.resnets."] = f"encoder.down.{i}.block."
        mapping[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = f"encoder.down.{i}.downsample.conv."
        ldm = levels - 1 - i  # the decoder's blocks are numbered the other way round in LDM
        mapping[f"decoder.up_blocks.{i}.resnets."] = f"decoder.up.{ldm}.block."
        mapping[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = f"decoder.up.{ldm}.upsample.conv."
    return mapping


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    blocks = _vae_block_prefixes(vae.config)
    attentions = {k: v for k, v in blocks.items() if ".attentions." in k}
    out = {}
    for key, tensor in vae.state_dict().items():
        renamed = _rename(key, attentions, _VAE_ATTENTION) or _rename(key, blocks) or key
        if ".mid_block.attentions." in key and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # LDM keeps these as 1x1 convolutions
        out[VAE_PREFIX + renamed.replace("conv_shortcut", "nin_shortcut")] = tensor
    return out


def clip_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in text_encoder.state_dict().items():
        bare = key.removeprefix("text_model.")
        out[CLIP_PREFIX + bare] = tensor
    return out


def pipeline_to_ldm(pipe) -> dict[str, torch.Tensor]:
    checkpoint = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae), **clip_to_ldm(pipe.text_encoder)}
    return {k: v.detach().to("cpu").contiguous() for k, v in checkpoint.items()}


def export_single_file(pipe, destination: Path) -> Path:
    from safetensors.torch import save_file

    family = family_of_pipeline(pipe)
    if family.name != "sd1":
        raise BaseModelError(f"single-file export writes the SD 1.x (LDM) layout; {family.title} is not done yet: "
                             "export it as a diffusers directory", field="format")
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    save_file(pipeline_to_ldm(pipe), str(destination), metadata={"format": "pt", "layout": "ldm"})
    return destination
