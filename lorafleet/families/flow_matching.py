"""Training by flow matching (rectified flow), as Flux and SD 3 are trained.

A sample on the straight path from data to noise, ``x_t = (1 - sigma) * x_0 + sigma * noise``, and the
denoiser regresses the velocity ``noise - x_0``. Sigmas are drawn as the popular Flux trainers draw
them (diffusers' ``compute_density_for_timestep_sampling``, kohya's and SimpleTuner's
``timestep_sampling``): ``sigmoid`` (sigmoid of a scaled standard normal), ``logit_normal`` (sigmoid of
a normal with a mean and spread) or ``uniform``; then optionally shifted toward noise, by a fixed
``shift`` or by the shift the scheduler applies at inference for the image's sequence length.
"""

from __future__ import annotations

# Imports inside functions: torch only when a family trains (families are asked for names at start-up).
import math

from .base import Noised, ObjectiveOptions, TrainingObjective


def shifted(sigmas, shift: float):
    """sigma -> shift*sigma / (1 + (shift-1)*sigma): more time near noise for larger images."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_sigmas(count: int, options: ObjectiveOptions, generator):
    import torch

    if options.timestep_sampling == "uniform":
        return torch.rand((count,), generator=generator)
    normal = torch.randn((count,), generator=generator)
    if options.timestep_sampling == "sigmoid":
        return torch.sigmoid(options.sigmoid_scale * normal)
    if options.timestep_sampling == "logit_normal":
        return torch.sigmoid(options.logit_mean + options.logit_std * normal)
    raise ValueError(f"unknown timestep sampling {options.timestep_sampling!r}")


def inference_mu(scheduler_config, image_sequence_length: int, max_shift: float = 1.15) -> float:
    """mu, the log of the shift a dynamically shifting FlowMatchEuler scheduler uses for this many
    image tokens (``max_shift`` when the config names none: Flux's pipeline says 1.15, SD 3's 1.16)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(image_sequence_length, scheduler_config.get("base_image_seq_len", 256),
                           scheduler_config.get("max_image_seq_len", 4096), scheduler_config.get("base_shift", 0.5),
                           scheduler_config.get("max_shift", max_shift))


def inference_shift(scheduler_config, image_sequence_length: int) -> float:
    """exp(mu): the shift itself."""
    return math.exp(inference_mu(scheduler_config, image_sequence_length))


class FlowMatching(TrainingObjective):
    """Flow matching for a family whose ``flow_prediction`` runs its transformer on unpacked latents."""

    def __init__(self, family, pipe, options: ObjectiveOptions):
        self.family, self.pipe, self.options = family, pipe, options

    def noised(self, latents, generator) -> Noised:
        import torch

        noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
        sigmas = sample_sigmas(latents.shape[0], self.options, generator)
        shift = self.options.shift
        if self.options.dynamic_shift:
            shift = inference_shift(self.pipe.scheduler.config, self.family.image_sequence_length(latents))
        if shift != 1.0:
            sigmas = shifted(sigmas, shift)
        sigmas = sigmas.to(latents.device, latents.dtype)
        expanded = sigmas.view(-1, *([1] * (latents.ndim - 1)))
        noisy = (1 - expanded) * latents + expanded * noise
        timesteps = sigmas * 1000  # the scheduler's timesteps: sigma x num_train_timesteps
        return Noised(noisy, timesteps, noise - latents, torch.ones(latents.shape[0]))

    def predict(self, noisy, timesteps, hidden, pooled, time_ids):
        return self.family.flow_prediction(self.pipe, noisy, timesteps, hidden, pooled, self.options)
