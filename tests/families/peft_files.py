"""LoRA layers as the families' diffusers training scripts make them: peft layers added to a model,
random and non-zero (so an adapter visibly changes the image), ready for `save_lora_weights`."""

from __future__ import annotations

import torch


def add_random_lora(model, targets, seed: int | None, rank: int = 4, alpha: float = 8.0):
    """Add a peft LoRA on ``targets`` with random A and B (scaled down), and return its config;
    ``seed`` None draws from the global generator as it stands."""
    from peft import LoraConfig

    if seed is not None:
        torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    model.add_adapter(config)
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.data.mul_(0.3)
    return config
