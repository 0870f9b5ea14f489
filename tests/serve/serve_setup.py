"""Constants of the serving tests and their reference: plain diffusers with the adapter file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

STEPS = 4
GUIDANCE = 5.0
PROMPT = "a red circle on the left"


def adapter_uses(fetcher, registry, refs, weights=None) -> list:
    """AdapterUse for each ref (weight 1 alone; 0.6 each when composed, unless given)."""
    from lorafleet.serve.jobs import AdapterUse

    weights = weights or [1.0 if len(refs) == 1 else 0.6] * len(refs)
    return [AdapterUse(fetcher.fetch(registry.resolve(ref)).adapter, w) for ref, w in zip(refs, weights)]


def run_one(engine, uses: list, job):
    """One request through the engine, in a pass of its own."""
    from lorafleet.serve.jobs import BatchRequest

    return engine.run_batch([BatchRequest(tuple(uses), job)])[0]


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


def diffusers_set_image(files: dict[str, float], prompt: str = PROMPT, negative_prompt: str | None = None,
                        seeds: tuple[int, ...] = (0,), steps: int = STEPS, guidance: float = GUIDANCE) -> np.ndarray:
    """The reference for a weighted adapter set: plain diffusers, ``set_adapters`` with weights."""
    from lorafleet.bases import load_base

    pipe = load_base("tiny").pipeline
    names = []
    for index, path in enumerate(files):
        pipe.load_lora_weights(str(path), adapter_name=f"a{index}")
        names.append(f"a{index}")
    if names:
        pipe.set_adapters(names, adapter_weights=list(files.values()))
    generator = [torch.Generator().manual_seed(seed) for seed in seeds]
    return pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance,
                num_images_per_prompt=len(seeds), generator=generator, output_type="np").images
