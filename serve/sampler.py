"""One denoising loop for a batch of images whose prompts, guidance and seeds differ.

A Stable Diffusion pipeline call takes one guidance scale and one negative prompt per call;
a batch of requests has one of each per image. This loop runs the pipeline's own pieces
(``encode_prompt``, ``prepare_latents``, the scheduler, the VAE and the image processor) in
the order ``StableDiffusionPipeline.__call__`` runs them, with guidance as a per-image tensor.
An image depends only on its own prompt, negative prompt, guidance and seed: run alone or in a
batch it comes out the same (to float rounding of batched matrix products).

The rows the models see are ordered as the pipeline orders them: the text encoder gets one row
per image (prompts, then negative prompts in a second call), the UNet ``[unconditional..., conditional...]``
when guidance is on. ``serve/routing.py`` relies on that order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lorafleet.accelerator import seeded_generators
from lorafleet.families import family_of_pipeline


@dataclass(frozen=True)
class ImageSpec:
    """What decides one image of a batch."""

    prompt: str
    negative_prompt: str | None
    guidance_scale: float
    seed: int


@dataclass(frozen=True)
class BatchShape:
    """What every image of one batch shares (the batch key's pipeline part)."""

    width: int
    height: int
    steps: int
    guided: bool  # classifier-free guidance on (guidance_scale > 1), as the pipeline decides it


def uses_guidance(guidance_scale: float) -> bool:
    return guidance_scale > 1.0


def _guidance(images: list[ImageSpec], like: torch.Tensor) -> torch.Tensor:
    scales = torch.tensor([image.guidance_scale for image in images], dtype=torch.float64)
    return scales.to(dtype=like.dtype, device=like.device).view(-1, *([1] * (like.ndim - 1)))


@torch.inference_mode()
def sample_images(pipe, shape: BatchShape, images: list[ImageSpec]) -> np.ndarray:
    """Images ``[n, height, width, 3]`` float32 in [0, 1], one per spec, from one batched loop."""
    device = pipe._execution_device
    family = family_of_pipeline(pipe)
    negatives = [image.negative_prompt for image in images] if shape.guided else None
    conditioning = family.encode(pipe, [image.prompt for image in images], negatives, device, shape.height,
                                 shape.width)
    prompt_embeds = conditioning.prompt_embeds
    pipe.scheduler.set_timesteps(shape.steps, device=device)
    generators = seeded_generators([image.seed for image in images])
    latents = pipe.prepare_latents(len(images), pipe.unet.config.in_channels, shape.height, shape.width,
                                   prompt_embeds.dtype, device, generators)
    step_kwargs = pipe.prepare_extra_step_kwargs(generators, 0.0)
    timestep_cond = _timestep_condition(pipe, images, latents)
    guidance = _guidance(images, latents)
    for t in pipe.scheduler.timesteps:
        model_input = torch.cat([latents] * 2) if shape.guided else latents
        model_input = pipe.scheduler.scale_model_input(model_input, t)
        noise = pipe.unet(model_input, t, encoder_hidden_states=prompt_embeds, timestep_cond=timestep_cond,
                          return_dict=False, **conditioning.denoiser_kwargs)[0]
        if shape.guided:
            unconditional, conditional = noise.chunk(2)
            noise = unconditional + guidance * (conditional - unconditional)
        latents = pipe.scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
    decoded = family.decode(pipe, latents)
    output = pipe.image_processor.postprocess(decoded, output_type="np", do_denormalize=[True] * len(images))
    return np.asarray(output, dtype=np.float32)


def _timestep_condition(pipe, images: list[ImageSpec], latents: torch.Tensor) -> torch.Tensor | None:
    """Guidance-distilled UNets (LCM) take the guidance scale as an embedding, per image here."""
    dim = pipe.unet.config.time_cond_proj_dim
    if dim is None:
        return None
    scales = torch.tensor([image.guidance_scale - 1 for image in images])
    return pipe.get_guidance_scale_embedding(scales, embedding_dim=dim).to(device=latents.device, dtype=latents.dtype)
