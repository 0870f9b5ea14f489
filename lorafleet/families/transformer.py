"""What the diffusion-transformer families (Flux, SD 3) share: T5 hidden states up to a maximum
length (the pipeline's own default, capped by the tokenizer's), 2x2 latent patches, a 16-channel VAE
with shift and scale, and training by flow matching (flow_matching.py)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import ModelFamily, ObjectiveOptions, TrainingObjective
from .flow_matching import FlowMatching


@dataclass(frozen=True)
class TransformerFamily(ModelFamily):
    t5_tokenizer: str = "tokenizer_2"  # the pipeline attribute of the T5 tokenizer
    t5_max_length: int = 512  # the pipeline's default max_sequence_length

    def max_sequence_length(self, pipe) -> int:
        return min(self.t5_max_length, int(getattr(pipe, self.t5_tokenizer).model_max_length))

    def pipeline_call_options(self, pipe) -> dict:
        return {"max_sequence_length": self.max_sequence_length(pipe)}

    def training_objective(self, pipe, options: ObjectiveOptions) -> TrainingObjective:
        return FlowMatching(self, pipe, options)

    @staticmethod
    def image_sequence_length(latents) -> int:
        """Image tokens for latents ``[..., h, w]``: one per 2x2 patch."""
        return (latents.shape[-2] // 2) * (latents.shape[-1] // 2)

    def decode(self, pipe, latents, height: int, width: int):
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        return pipe.vae.decode(latents, return_dict=False)[0]

    def flow_prediction(self, pipe, noisy, timesteps, hidden, pooled, options: ObjectiveOptions):
        """The transformer's velocity for latents ``[batch, 16, h, w]`` at ``timesteps`` (sigma x 1000)."""
        raise NotImplementedError
