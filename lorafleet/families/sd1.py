"""Stable Diffusion 1.x/2.x: a UNet conditioned on one CLIP text encoder's hidden states."""

from __future__ import annotations

# Imports inside functions: torch only when prompts are encoded (families are asked for names at
# start-up).
from dataclasses import dataclass

from .base import Conditioning
from .unet import UNetFamily


@dataclass(frozen=True)
class StableDiffusion1(UNetFamily):
    @property
    def load_options(self) -> dict:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def recognises_checkpoint(self, keys: set[str]) -> bool:
        return any(k.startswith("model.diffusion_model.") for k in keys) and \
            any(k.startswith("cond_stage_model.") for k in keys)

    def encode(self, pipe, prompts, negatives, device, height: int, width: int) -> Conditioning:
        guided = negatives is not None
        prompt_embeds, negative_embeds = pipe.encode_prompt(
            prompts, device, 1, guided, [n or "" for n in negatives] if guided else None)
        return Conditioning(prompt_embeds if not guided else _cat(negative_embeds, prompt_embeds))


def _cat(first, second):
    import torch

    return torch.cat([first, second])


SD1 = StableDiffusion1(
    name="sd1",
    title="Stable Diffusion 1.x/2.x",
    pipeline_classes=("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
    denoiser="unet",
    text_encoders=("text_encoder",),
    tokenizers=("tokenizer",),
    native_resolution=512,
    example_base="toy",
    example_rank=4,
    example_learning_rate=0.001,
    kohya_prefixes=(("unet", "unet"), ("text_encoder", "te")),
    checkpoint_text_encoders=(("text_encoder", "cond_stage_model.transformer.text_model.", "clip"),),
)
