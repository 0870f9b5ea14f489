"""What UNet families (SD 1.x/2.x, SDXL) share: the denoising loop with classifier-free guidance as
doubled rows, and training by noise (or velocity) prediction at DDPM timesteps.

The loop runs the pipeline's own pieces (``prepare_latents``, the scheduler, the UNet, the VAE) in
the order ``StableDiffusionPipeline.__call__`` runs them, with guidance as a per-image tensor. The
UNet sees ``[unconditional..., conditional...]`` rows when guidance is on; serve/routing.py relies
on that order.
"""

from __future__ import annotations

# Imports inside functions: torch and diffusers only when a pipeline samples or trains (families
# are asked for names at start-up).
from dataclasses import dataclass

from .base import (
    BatchShape,
    Conditioning,
    ImageSpec,
    ModelFamily,
    Noised,
    ObjectiveOptions,
    TrainingObjective,
    between,
    per_image,
)


@dataclass(frozen=True)
class UNetFamily(ModelFamily):
    def denoise(self, pipe, shape: BatchShape, images: list[ImageSpec], conditioning: Conditioning, generators,
                between_steps=None):
        import torch

        device = conditioning.device
        prompt_embeds = conditioning.prompt_embeds
        pipe.scheduler.set_timesteps(shape.steps, device=device)
        latents = pipe.prepare_latents(len(images), pipe.unet.config.in_channels, shape.height, shape.width,
                                       prompt_embeds.dtype, device, generators)
        step_kwargs = pipe.prepare_extra_step_kwargs(generators, 0.0)
        timestep_cond = _timestep_condition(pipe, images, latents)
        guidance = per_image([image.guidance_scale for image in images], latents)
        for t in between(pipe.scheduler.timesteps, between_steps):
            model_input = torch.cat([latents] * 2) if shape.guided else latents
            model_input = pipe.scheduler.scale_model_input(model_input, t)
            noise = pipe.unet(model_input, t, encoder_hidden_states=prompt_embeds, timestep_cond=timestep_cond,
                              return_dict=False, **conditioning.denoiser_kwargs)[0]
            if shape.guided:
                unconditional, conditional = noise.chunk(2)
                noise = unconditional + guidance * (conditional - unconditional)
            latents = pipe.scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
        return latents

    def added_conditioning(self, pooled, time_ids) -> dict:
        """What the UNet takes beyond hidden states in training (``time_ids``: [batch, 6] of original
        height and width, crop top and left, target height and width)."""
        return {}

    def training_objective(self, pipe, options: ObjectiveOptions) -> TrainingObjective:
        return NoisePrediction(self, pipe, options)


def _timestep_condition(pipe, images: list[ImageSpec], latents):
    """Guidance-distilled UNets (LCM) take the guidance scale as an embedding, per image here."""
    import torch

    dim = pipe.unet.config.time_cond_proj_dim
    if dim is None:
        return None
    scales = torch.tensor([image.guidance_scale - 1 for image in images])
    return pipe.get_guidance_scale_embedding(scales, embedding_dim=dim).to(device=latents.device, dtype=latents.dtype)


class NoisePrediction(TrainingObjective):
    """DDPM training: uniform timesteps, the scheduler's noise, an epsilon or velocity target,
    optional offset noise and Min-SNR-gamma weighting."""

    def __init__(self, family: UNetFamily, pipe, options: ObjectiveOptions):
        from diffusers import DDPMScheduler

        self.family, self.pipe, self.options = family, pipe, options
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    def noised(self, latents, generator) -> Noised:
        import torch

        noise = torch.randn(latents.shape, generator=generator)
        if self.options.noise_offset:
            noise += self.options.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=generator)
        noise, timesteps = noise.to(latents.device), timesteps.to(latents.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        target = noise if self.scheduler.config.prediction_type == "epsilon" else \
            self.scheduler.get_velocity(latents, noise, timesteps)
        return Noised(noisy, timesteps, target, self._snr_weights(timesteps))

    def _snr_weights(self, timesteps):
        import torch

        gamma = self.options.min_snr_gamma
        if gamma is None:
            return torch.ones(timesteps.shape[0])
        alphas = self.scheduler.alphas_cumprod[timesteps.cpu()]
        snr = alphas / (1 - alphas)
        return torch.minimum(snr, torch.full_like(snr, gamma)) / snr

    def predict(self, noisy, timesteps, hidden, pooled, time_ids):
        extra = self.family.added_conditioning(pooled, time_ids)
        return self.pipe.unet(noisy, timesteps, hidden, **extra).sample
