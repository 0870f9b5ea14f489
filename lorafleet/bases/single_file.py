"""Writing a base as one original-layout (LDM / SGM, A1111) .safetensors checkpoint.

Real Stable Diffusion 1.x and SDXL checkpoints are distributed this way; lorafleet loads them
with diffusers' ``from_single_file`` (configs from a diffusers directory, offline). This writer
exists so that path is tested on weights we build ourselves: it maps diffusers names back to the
original ones (the inverse of diffusers' conversion) for the UNet (families/ldm.py), the VAE, and
the text encoders the family lays out (CLIP as transformers names it; SDXL's second encoder as
OpenCLIP does, with q, k and v in one ``in_proj``).
"""

from __future__ import annotations

# Imports inside functions: safetensors' torch API only when a checkpoint is read or written.
from pathlib import Path

import torch

from lorafleet.families import family_of_pipeline
from lorafleet.families.ldm import ldm_unet_namer

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
_VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
_OPENCLIP_LAYER = {"layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj.",
                   "self_attn.out_proj.": "attn.out_proj."}


def _rename(key: str, table: dict[str, str], inner: dict[str, str] | None = None) -> str | None:
    """Replace the first matching prefix; ``inner`` renames what follows it."""
    for old, new in table.items():
        if key.startswith(old):
            rest = key[len(old):]
            return new + ((_rename(rest, inner) or rest) if inner else rest)
    return None


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    ldm_name = ldm_unet_namer(unet.config)
    return {UNET_PREFIX + ldm_name(key): tensor for key, tensor in unet.state_dict().items()}


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


def clip_to_ldm(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A CLIP text encoder as transformers 4 named it (``text_model.`` included) under ``prefix``."""
    return {prefix + key.removeprefix("text_model."): tensor for key, tensor in text_encoder.state_dict().items()
            if not key.endswith("position_ids")}


def openclip_to_ldm(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """SDXL's second text encoder as OpenCLIP names it (the inverse of diffusers'
    convert_open_clip_checkpoint): q, k, v stacked into in_proj; the projection transposed."""
    state = {key.removeprefix("text_model."): tensor for key, tensor in text_encoder.state_dict().items()}
    out = {prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           prefix + "text_projection": state.pop("text_projection.weight").T.contiguous()}
    state.pop("embeddings.position_ids", None)
    for side in ("weight", "bias"):
        out[prefix + f"ln_final.{side}"] = state.pop(f"final_layer_norm.{side}")
    for index in range(text_encoder.config.num_hidden_layers):
        layer, block = f"encoder.layers.{index}.", f"{prefix}transformer.resblocks.{index}."
        for side in ("weight", "bias"):
            out[block + f"attn.in_proj_{side}"] = torch.cat(
                [state.pop(f"{layer}self_attn.{p}_proj.{side}") for p in ("q", "k", "v")])
        for key in [k for k in state if k.startswith(layer)]:
            out[block + _rename(key[len(layer):], _OPENCLIP_LAYER)] = state.pop(key)
    if state:
        raise ValueError(f"no OpenCLIP name for {sorted(state)[:3]}")
    return out


_TEXT_WRITERS = {"clip": clip_to_ldm, "openclip": openclip_to_ldm}


def pipeline_to_ldm(pipe) -> dict[str, torch.Tensor]:
    family = family_of_pipeline(pipe)
    checkpoint = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae)}
    for component, prefix, kind in family.checkpoint_text_encoders:
        checkpoint.update(_TEXT_WRITERS[kind](getattr(pipe, component), prefix))
    return {k: v.detach().to("cpu").contiguous() for k, v in checkpoint.items()}


def transformer_to_bfl(pipe) -> dict[str, torch.Tensor]:
    """Flux as Black Forest Labs distribute it: the transformer alone, in their layout."""
    from lorafleet.families.flux_layout import to_bfl

    transformer = pipe.transformer
    checkpoint = to_bfl(transformer.state_dict(), transformer.config)
    return {k: v.detach().to("cpu").contiguous() for k, v in checkpoint.items()}


_WRITERS = {"ldm": pipeline_to_ldm, "bfl-transformer": transformer_to_bfl}


def export_single_file(pipe, destination: Path) -> Path:
    """The base in its family's original single-file layout (``ModelFamily.single_file_layout``)."""
    from safetensors.torch import save_file

    layout = family_of_pipeline(pipe).single_file_layout

    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    save_file(_WRITERS[layout](pipe), str(destination), metadata={"format": "pt", "layout": layout})
    return destination
