"""Registry test fixtures: adapter files written by the tools users have."""

from __future__ import annotations

import pytest
import torch

from lorafleet.bases import load_base


def train_like_lora(pipe, rank: int, alpha: float, text_encoder: bool):
    """Attach peft LoRAs the way diffusers' training scripts do, with non-zero B."""
    from peft import LoraConfig

    unet_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    pipe.unet.add_adapter(unet_config)
    configs = {"unet": unet_config}
    if text_encoder:
        te_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj"])
        pipe.text_encoder.add_adapter(te_config)
        configs["text_encoder"] = te_config
    generator = torch.Generator().manual_seed(1)
    for model in (pipe.unet, pipe.text_encoder):
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.data = torch.randn(parameter.shape, generator=generator) * 0.3
    return configs


@pytest.fixture(scope="session")
def diffusers_lora_dir(tmp_path_factory):
    """A LoRA saved by diffusers' own save_lora_weights, rank 4 with alpha 8 (scale 2)."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    pipe = load_base("tiny").pipeline
    configs = train_like_lora(pipe, rank=4, alpha=8, text_encoder=True)
    directory = tmp_path_factory.mktemp("diffusers-lora")
    StableDiffusionPipeline.save_lora_weights(
        str(directory),
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=configs["unet"].to_dict(),
        text_encoder_lora_adapter_metadata=configs["text_encoder"].to_dict(),
    )
    return directory


