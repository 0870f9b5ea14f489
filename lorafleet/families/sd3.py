"""Stable Diffusion 3 / 3.5: an MMDiT (joint-attention transformer over 2x2 latent patches) conditioned
on two CLIP encoders (hidden states concatenated, padded to T5's width, then T5's hidden states
appended; the pooled embeddings concatenated), trained by flow matching, guided by classic CFG with
doubled rows as UNet families are. LoRAs reach the transformer and both CLIP encoders, as diffusers'
SD3 loader allows (T5 is never adapted).
"""

from __future__ import annotations

# Imports inside functions: torch and diffusers only when a pipeline samples or trains.
from dataclasses import dataclass

from .base import BatchShape, Conditioning, ImageSpec, ObjectiveOptions, between, per_image
from .transformer import TransformerFamily


@dataclass(frozen=True)
class StableDiffusion3(TransformerFamily):
    def recognises_checkpoint(self, keys: set[str]) -> bool:
        return False  # original-layout SD3 checkpoints are not read (diffusers directories are)

    def native_size(self, pipe) -> int:
        return int(pipe.transformer.config.sample_size) * int(pipe.vae_scale_factor)

    def encode(self, pipe, prompts, negatives, device, height: int, width: int) -> Conditioning:
        import torch

        guided = negatives is not None
        embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompts, None, None, device=device, do_classifier_free_guidance=guided,
            negative_prompt=[n or "" for n in negatives] if guided else None,
            max_sequence_length=self.max_sequence_length(pipe))
        if guided:
            embeds, pooled = torch.cat([negative_embeds, embeds]), torch.cat([negative_pooled, pooled])
        return Conditioning(embeds, {"pooled_projections": pooled})

    def denoise(self, pipe, shape: BatchShape, images: list[ImageSpec], conditioning: Conditioning, generators,
                between_steps=None):
        """``StableDiffusion3Pipeline.__call__``'s loop with per-image guidance (no skip-layer guidance)."""
        import torch
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps

        from .flow_matching import inference_mu

        device = conditioning.device
        latents = pipe.prepare_latents(len(images), pipe.transformer.config.in_channels, shape.height, shape.width,
                                       conditioning.prompt_embeds.dtype, device, generators)
        options = {}
        if pipe.scheduler.config.get("use_dynamic_shifting"):
            options["mu"] = inference_mu(pipe.scheduler.config, self.image_sequence_length(latents), max_shift=1.16)
        timesteps, _ = retrieve_timesteps(pipe.scheduler, shape.steps, device, **options)
        guidance = per_image([image.guidance_scale for image in images], latents)
        for t in between(timesteps, between_steps):
            model_input = torch.cat([latents] * 2) if shape.guided else latents
            noise = pipe.transformer(hidden_states=model_input, timestep=t.expand(model_input.shape[0]),
                                     encoder_hidden_states=conditioning.prompt_embeds, joint_attention_kwargs=None,
                                     return_dict=False, **conditioning.denoiser_kwargs)[0]
            if shape.guided:
                unconditional, conditional = noise.chunk(2)
                noise = unconditional + guidance * (conditional - unconditional)
            latents = pipe.scheduler.step(noise, t, latents, return_dict=False)[0]
        return latents

    def encode_for_training(self, pipe, captions: list[str], device):
        """(CLIP+T5 hidden states, both CLIPs' pooled embeddings), as ``encode_prompt`` makes them."""
        embeds, _, pooled, _ = pipe.encode_prompt(captions, None, None, device=device,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=self.max_sequence_length(pipe))
        return embeds, pooled

    def flow_prediction(self, pipe, noisy, timesteps, hidden, pooled, options: ObjectiveOptions):
        """The transformer's velocity; SD3's transformer takes timesteps in [0, 1000]."""
        return pipe.transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=hidden,
                                pooled_projections=pooled, return_dict=False)[0]


SD3 = StableDiffusion3(
    name="sd3",
    title="Stable Diffusion 3.5",
    pipeline_classes=("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
                      "StableDiffusion3InpaintPipeline"),
    denoiser="transformer",
    text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),
    tokenizers=("tokenizer", "tokenizer_2", "tokenizer_3"),
    adapted_text_encoders=("text_encoder", "text_encoder_2"),
    native_resolution=1024,
    example_base="tiny-sd3",
    example_rank=16,
    example_learning_rate=0.0001,
    example_targets=("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"),
    example_resolution=64,
    kohya_prefixes=(),  # no kohya layout is read or written for SD3
    size_multiple=16,  # the VAE's 8, times the 2x2 patches
    default_guidance_scale=7.0,
    objective="flow_matching",
    textual_inversion=False,  # StableDiffusion3Pipeline loads no embeddings
    t5_tokenizer="tokenizer_3",
    t5_max_length=256,  # StableDiffusion3Pipeline's default
)
