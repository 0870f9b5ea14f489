"""Fixtures for serving tests: a registry with adapters, and plain-diffusers reference images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lorafleet.registry import AdapterRegistry, PublishRequest

STEPS = 4
GUIDANCE = 5.0
PROMPT = "a red circle on the left"


@pytest.fixture(scope="module")
def adapter_registry(tmp_path_factory, tiny_spec):
    """A file registry with five LoRAs (one also on the text encoder) and a textual inversion."""
    from helpers import write_embedding, write_lora

    root = tmp_path_factory.mktemp("serve-registry")
    registry = AdapterRegistry(f"file://{root / 'registry'}")
    for index in range(5):
        te = ("q_proj", "v_proj") if index == 0 else ()
        path = write_lora(root / f"src{index}", tiny_spec, seed=10 + index, text_encoder_targets=te)
        registry.publish(path, PublishRequest(name=f"style{index}", base=tiny_spec, aliases=["prod"]))
    registry.publish(write_embedding(root / "ti", tiny_spec, "<sks>", seed=3),
                     PublishRequest(name="sks-token", base=tiny_spec))
    return registry


def plain_diffusers_image(adapter_file: Path | None, prompt: str = PROMPT, seed: int = 0, steps: int = STEPS,
                          guidance: float = GUIDANCE, textual_inversion: Path | None = None) -> np.ndarray:
    """The reference: a fresh base pipeline, plain diffusers loading of the adapter file."""
    from lorafleet.bases import load_base

    pipe = load_base("tiny").pipeline
    if adapter_file is not None:
        pipe.load_lora_weights(str(adapter_file))
    if textual_inversion is not None:
        pipe.load_textual_inversion(str(textual_inversion))
    generator = [torch.Generator().manual_seed(seed)]
    return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                output_type="np").images[0]


@pytest.fixture(scope="module")
def pulled_files(adapter_registry, tmp_path_factory):
    directory = tmp_path_factory.mktemp("pulled")
    files = {}
    for name in [f"style{i}" for i in range(5)] + ["sks-token"]:
        _, path = adapter_registry.pull(name, directory)
        files[name] = path
    return files
