"""Flux: a diffusion transformer (double-stream then single-stream blocks, joint attention) over
packed 2x2 latent patches, conditioned on T5 hidden states and CLIP's pooled embedding, trained by
flow matching. Flux-dev takes its guidance as an embedding (one pass per step, no doubled rows);
``true_cfg_scale`` with a negative prompt adds classic CFG as a second pass, as ``FluxPipeline`` does.

LoRAs reach the transformer and the CLIP text encoder (T5 is never adapted, as in diffusers and the
trainers); textual inversion reaches CLIP. kohya and single-file checkpoints use Black Forest Labs'
names, which fuse some of diffusers' layers (flux_layout.py).
"""

from __future__ import annotations

# Imports inside functions: torch and diffusers only when a pipeline samples, trains or loads.
import re
from dataclasses import dataclass

from .base import BatchShape, Conditioning, ImageSpec, ObjectiveOptions, UnknownFamily, between, per_image
from .flux_layout import bfl_groups
from .transformer import TransformerFamily

_XLABS_KEY = re.compile(
    r"^(?:diffusion_model\.)?double_blocks\.(\d+)\.processor\.(qkv|proj)_lora([12])\.(down|up)\.weight$")
_XLABS_STREAMS = {"1": "img", "2": "txt"}
BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # ComfyUI / original checkpoints may carry one


@dataclass(frozen=True)
class Flux(TransformerFamily):
    def recognises_checkpoint(self, keys: set[str]) -> bool:
        return any(_bfl_name(k).startswith("double_blocks.") for k in keys)

    def guided(self, guidance_scale: float, true_cfg_scale: float, negative_prompt: str | None) -> bool:
        return true_cfg_scale > 1.0 and negative_prompt is not None  # as FluxPipeline's do_true_cfg

    def native_size(self, pipe) -> int:
        return int(pipe.vae.config.sample_size)  # the transformer has no size of its own

    # ------------------------------------------------------------------ sampling
    def encode(self, pipe, prompts, negatives, device, height: int, width: int) -> Conditioning:
        conditioning = self._encode(pipe, prompts, device)
        if negatives is not None:
            conditioning.negative = self._encode(pipe, [n or "" for n in negatives], device)
        return conditioning

    def _encode(self, pipe, prompts: list[str], device) -> Conditioning:
        embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                                      num_images_per_prompt=1,
                                                      max_sequence_length=self.max_sequence_length(pipe))
        return Conditioning(embeds, {"pooled_projections": pooled, "txt_ids": text_ids})

    def denoise(self, pipe, shape: BatchShape, images: list[ImageSpec], conditioning: Conditioning, generators,
                between_steps=None):
        """``FluxPipeline.__call__``'s loop, with per-image guidance and true-CFG scales."""
        import numpy as np
        import torch
        from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

        from .flow_matching import inference_mu

        device = conditioning.device
        transformer = pipe.transformer
        latents, image_ids = pipe.prepare_latents(len(images), transformer.config.in_channels // 4, shape.height,
                                                  shape.width, conditioning.prompt_embeds.dtype, device, generators)
        sigmas = None if pipe.scheduler.config.get("use_flow_sigmas") else \
            np.linspace(1.0, 1 / shape.steps, shape.steps)
        mu = inference_mu(pipe.scheduler.config, latents.shape[1])
        timesteps, _ = retrieve_timesteps(pipe.scheduler, shape.steps, device, sigmas=sigmas, mu=mu)
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.tensor([image.guidance_scale for image in images], dtype=torch.float32, device=device)
        true_cfg = per_image([image.true_cfg_scale for image in images], latents)
        pipe.scheduler.set_begin_index(0)
        for t in between(timesteps, between_steps):
            timestep = t.expand(latents.shape[0]).to(latents.dtype) / 1000
            noise = self._transformer(transformer, latents, timestep, guidance, conditioning, image_ids)
            if shape.guided:
                negative = self._transformer(transformer, latents, timestep, guidance, conditioning.negative,
                                             image_ids)
                noise = negative + true_cfg * (noise - negative)
            latents = pipe.scheduler.step(noise, t, latents, return_dict=False)[0]
        return latents

    @staticmethod
    def _transformer(transformer, latents, timestep, guidance, conditioning: Conditioning, image_ids):
        return transformer(hidden_states=latents, timestep=timestep, guidance=guidance,
                           encoder_hidden_states=conditioning.prompt_embeds, img_ids=image_ids,
                           joint_attention_kwargs={}, return_dict=False, **conditioning.denoiser_kwargs)[0]

    def latents_of_pipeline_output(self, pipe, latents, height: int, width: int):
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)

    def decode(self, pipe, latents, height: int, width: int):
        return super().decode(pipe, pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor), height, width)

    # ------------------------------------------------------------------ training
    def encode_for_training(self, pipe, captions: list[str], device):
        """(T5 hidden states, CLIP pooled embedding), as ``FluxPipeline.encode_prompt`` makes them
        (with gradients when CLIP trains: the pipeline's own helpers carry none of their own)."""
        pooled = pipe._get_clip_prompt_embeds(prompt=captions, device=device, num_images_per_prompt=1)
        hidden = pipe._get_t5_prompt_embeds(prompt=captions, num_images_per_prompt=1,
                                            max_sequence_length=self.max_sequence_length(pipe), device=device)
        return hidden, pooled

    def flow_prediction(self, pipe, noisy, timesteps, hidden, pooled, options: ObjectiveOptions):
        """The transformer's velocity for unpacked latents ``[batch, 16, h, w]``, unpacked again."""
        import torch

        batch, channels, height, width = noisy.shape
        packed = pipe._pack_latents(noisy, batch, channels, height, width)
        image_ids = pipe._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, noisy.dtype)
        text_ids = torch.zeros(hidden.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = None
        if pipe.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), options.guidance_scale, dtype=torch.float32, device=noisy.device)
        velocity = pipe.transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                                    pooled_projections=pooled, encoder_hidden_states=hidden, txt_ids=text_ids,
                                    img_ids=image_ids, return_dict=False)[0]
        scale = pipe.vae_scale_factor
        return pipe._unpack_latents(velocity, height * scale, width * scale, scale)

    # ------------------------------------------------------------------ original names
    def kohya_names(self, pipe, component: str, module_paths) -> dict[str, str]:
        if component != self.denoiser:
            return super().kohya_names(pipe, component, module_paths)
        return {group.bfl.replace(".", "_"): group.parts[0] for group in bfl_groups(pipe.transformer.config)
                if len(group.parts) == 1 and not group.swap_halves}

    def kohya_groups(self, pipe, component: str) -> dict[str, tuple[tuple[str, ...], bool]]:
        if component != self.denoiser:
            return {}
        return {group.bfl.replace(".", "_"): (group.parts, group.swap_halves)
                for group in bfl_groups(pipe.transformer.config) if len(group.parts) > 1 or group.swap_halves}

    def foreign_lora_as_kohya(self, keys) -> tuple[dict[str, str], str] | None:
        """XLabs' Flux LoRAs (``double_blocks.N.processor.qkv_lora1.down.weight``): stream 1 is the
        image stream, 2 the text stream; no alpha (the update is up @ down, as diffusers reads them)."""
        renamed = {}
        for key in keys:
            match = _XLABS_KEY.match(key)
            if match is None:
                return None
            block, kind, stream, side = match.groups()
            renamed[key] = f"lora_unet_double_blocks_{block}_{_XLABS_STREAMS[stream]}_attn_{kind}.lora_{side}.weight"
        return (renamed, "xlabs") if renamed else None

    def load_single_file(self, path: str, base_config: str | None):
        """A BFL-layout transformer checkpoint (as Black Forest Labs and ComfyUI distribute Flux),
        with the text encoders, VAE, scheduler and the transformer's config from ``base_config``."""
        from safetensors.torch import load_file

        from .flux_layout import from_bfl

        if base_config is None:
            raise UnknownFamily("a Flux transformer checkpoint holds only the transformer: pass --base-config DIR, "
                                "a Flux diffusers directory, for its config, text encoders, VAE and scheduler",
                                field="base_config")
        pipe = self.load_pipeline_class().from_pretrained(base_config, local_files_only=True, use_safetensors=True)
        transformer = pipe.transformer
        checkpoint = {_bfl_name(key): tensor for key, tensor in load_file(path).items()}
        out_features = {name: module.out_features for name, module in transformer.named_modules()
                        if hasattr(module, "out_features")}
        state = from_bfl(checkpoint, transformer.config, out_features)
        transformer.load_state_dict(state, strict=True)
        return pipe


def _bfl_name(key: str) -> str:
    for prefix in BFL_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


FLUX_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                     "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                     "ff_context.net.2", "proj_mlp")

FLUX = Flux(
    name="flux",
    title="Flux",
    pipeline_classes=("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"),
    denoiser="transformer",
    text_encoders=("text_encoder", "text_encoder_2"),
    tokenizers=("tokenizer", "tokenizer_2"),
    adapted_text_encoders=("text_encoder",),
    native_resolution=1024,
    example_base="tiny-flux",
    example_rank=16,
    example_learning_rate=0.0001,
    example_targets=FLUX_LORA_TARGETS,
    example_resolution=64,
    objective="flow_matching",
    single_file_layout="bfl-transformer",
    kohya_prefixes=(("transformer", "unet"), ("text_encoder", "te1")),
    size_multiple=16,  # the VAE's 8, times 2 for the packed 2x2 patches
    default_guidance_scale=3.5,
    offers_true_cfg=True,
    t5_max_length=512,  # FluxPipeline's default (schnell is used with 256)
)
