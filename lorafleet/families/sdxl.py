"""Stable Diffusion XL: a UNet conditioned on two CLIP text encoders (hidden states concatenated),
the second one's pooled embedding and six size numbers per image (``add_time_ids``).

kohya/A1111 SDXL LoRAs name UNet modules as Stability's SGM UNet does (``input_blocks.4.1...``;
ldm.py maps diffusers paths to those names, diffusers' kohya loader maps them back).
"""

from __future__ import annotations

# Imports inside functions: torch only when prompts are encoded or images decoded (families are
# asked for names at start-up).
from dataclasses import dataclass

from .base import Conditioning
from .ldm import ldm_unet_namer
from .unet import UNetFamily


@dataclass(frozen=True)
class StableDiffusionXL(UNetFamily):
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

    def added_conditioning(self, pooled, time_ids) -> dict:
        return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device, pooled.dtype)}}

    def decode(self, pipe, latents, height: int, width: int):
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
        ldm_name = ldm_unet_namer(pipe.unet.config)
        return {ldm_name(path).replace(".", "_"): path for path in module_paths}


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
    default_guidance_scale=5.0,
    kohya_prefixes=(("unet", "unet"), ("text_encoder", "te1"), ("text_encoder_2", "te2")),
    checkpoint_text_encoders=(("text_encoder", "conditioner.embedders.0.transformer.text_model.", "clip"),
                              ("text_encoder_2", "conditioner.embedders.1.model.", "openclip")),
    embedding_keys=(("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")),  # as A1111 and civitai files
)
