"""Stable Diffusion XL: a UNet conditioned on two CLIP text encoders (hidden states concatenated),
the second one's pooled embedding and six size numbers per image (``add_time_ids``).

kohya/A1111 SDXL LoRAs name UNet modules as Stability's SGM UNet does (``input_blocks.4.1...``);
``sgm_path`` maps a diffusers module path to that name (diffusers' kohya loader maps it back).
"""

from __future__ import annotations

# Imports inside functions: torch only when prompts are encoded or images decoded (families are
# asked for names at start-up).
from dataclasses import dataclass

from .base import Conditioning, ModelFamily

_RESNET_LAYERS = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                  "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}
_TOP_LEVEL = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0",
              "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def sgm_path(path: str, layers_per_block: int, up_blocks_with_attention: tuple[bool, ...]) -> str:
    """The SGM (original SDXL) name of a diffusers UNet module path."""
    for diffusers_name, sgm_name in _TOP_LEVEL.items():
        if path == diffusers_name or path.startswith(diffusers_name + "."):
            return sgm_name + path[len(diffusers_name):]
    parts = path.split(".")
    if parts[0] in ("down_blocks", "up_blocks"):
        level, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        head = _level_block(parts[0], level, kind, index, layers_per_block, up_blocks_with_attention)
    elif parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), parts[3:]
        head = f"middle_block.{1 if kind == 'attentions' else 2 * index}"
    else:
        return path
    if kind == "resnets" and rest and rest[0] in _RESNET_LAYERS:
        rest = [_RESNET_LAYERS[rest[0]], *rest[1:]]
    if kind == "downsamplers" and rest[:1] == ["conv"]:
        rest = ["op", *rest[1:]]
    return ".".join([head, *rest])


def _level_block(block: str, level: int, kind: str, index: int, per_block: int,
                 up_attention: tuple[bool, ...]) -> str:
    if block == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{(level + 1) * (per_block + 1)}.0"
        return f"input_blocks.{1 + level * (per_block + 1) + index}.{1 if kind == 'attentions' else 0}"
    if kind == "upsamplers":  # after the resnet, and the attention where the level has one
        return f"output_blocks.{level * (per_block + 1) + per_block}.{2 if up_attention[level] else 1}"
    return f"output_blocks.{level * (per_block + 1) + index}.{1 if kind == 'attentions' else 0}"


@dataclass(frozen=True)
class StableDiffusionXL(ModelFamily):
    @property
    def load_options(self) -> dict:
        return {"add_watermarker": False}  # the pipeline's own image must be the image we compare

    def recognises_checkpoint(self, keys: set[str]) -> bool:
        return any(k.startswith("conditioner.embedders.") for k in keys)

    def encode(self, pipe, prompts, negatives, device, height: int, width: int) -> Conditioning:
        import torch

        guided = negatives is not None
        embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=guided,
            negative_prompt=[n or "" for n in negatives] if guided else None)
        time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=embeds.dtype,
                                          text_encoder_projection_dim=int(pipe.text_encoder_2.config.projection_dim))
        time_ids = time_ids.to(device).repeat(len(prompts), 1)
        if guided:
            # The pipeline zeroes an absent negative prompt (force_zeros_for_empty_prompt): per row here.
            absent = torch.tensor([n is None for n in negatives], device=device)
            if pipe.config.force_zeros_for_empty_prompt:
                negative_embeds = torch.where(absent.view(-1, 1, 1), 0.0, negative_embeds)
                negative_pooled = torch.where(absent.view(-1, 1), 0.0, negative_pooled)
            embeds, pooled = torch.cat([negative_embeds, embeds]), torch.cat([negative_pooled, pooled])
            time_ids = torch.cat([time_ids, time_ids])
        return Conditioning(embeds, {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}})

    def encode_for_training(self, pipe, captions: list[str], device):
        """Both encoders' penultimate hidden states, concatenated, and the second one's pooled
        projection: what ``StableDiffusionXLPipeline.encode_prompt`` computes (clip_skip unset)."""
        import torch

        hidden, pooled = [], None
        for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            output = encoder(ids, output_hidden_states=True)
            pooled = output[0]  # the last encoder's text_embeds
            hidden.append(output.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    def denoiser_kwargs(self, pooled, time_ids) -> dict:
        return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device, pooled.dtype)}}

    def decode(self, pipe, latents):
        import torch

        vae = pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast  # SDXL's VAE overflows in fp16
        if upcast:
            vae.to(dtype=torch.float32)
            latents = latents.to(torch.float32)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, len(mean), 1, 1)
            mean = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        images = vae.decode(latents, return_dict=False)[0]
        if upcast:
            vae.to(dtype=torch.float16)
        return images

    def kohya_names(self, pipe, component: str, module_paths) -> dict[str, str]:
        if component != self.denoiser:
            return super().kohya_names(pipe, component, module_paths)
        config = pipe.unet.config
        with_attention = tuple("CrossAttn" in kind for kind in config.up_block_types)
        return {sgm_path(path, config.layers_per_block, with_attention).replace(".", "_"): path
                for path in module_paths}


SDXL = StableDiffusionXL(
    name="sdxl",
    title="Stable Diffusion XL",
    pipeline_classes=("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                      "StableDiffusionXLInpaintPipeline"),
    denoiser="unet",
    text_encoders=("text_encoder", "text_encoder_2"),
    tokenizers=("tokenizer", "tokenizer_2"),
    native_resolution=1024,
    example_base="tiny-sdxl",
    example_rank=16,
    example_learning_rate=0.0001,
    kohya_prefixes=(("unet", "unet"), ("text_encoder", "te1"), ("text_encoder_2", "te2")),
    embedding_keys=(("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")),  # as A1111 and civitai files
)
