"""Measure what a pipeline draws: generate prompts over seeds and judge each image with the scorer."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .scorer import score

EVAL_STEPS = 20
EVAL_GUIDANCE = 4.0


@dataclass
class ConceptScore:
    prompts: int
    images: int
    colour_accuracy: float
    shape_accuracy: float
    both_accuracy: float
    rejected: float
    per_prompt: dict = field(default_factory=dict)


def generate(pipe, prompt: str, seeds: list[int], steps: int = EVAL_STEPS, guidance: float = EVAL_GUIDANCE,
             **kwargs) -> np.ndarray:
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    with torch.no_grad():
        return pipe([prompt] * len(seeds), num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                    output_type="np", **kwargs).images


def concept_accuracy(pipe, targets: dict[str, tuple[str, str]], seeds: list[int], **kwargs) -> ConceptScore:
    """``targets``: prompt -> (expected colour, expected shape). Accuracy over prompts x seeds."""
    colour = shape = both = rejected = total = 0
    per_prompt = {}
    for prompt, (want_colour, want_shape) in targets.items():
        images = generate(pipe, prompt, seeds, **kwargs)
        verdicts = [score(image) for image in images]
        hits = [(v.colour == want_colour, v.shape == want_shape) for v in verdicts]
        colour += sum(c for c, _ in hits)
        shape += sum(s for _, s in hits)
        both += sum(c and s for c, s in hits)
        rejected += sum(not v.accepted for v in verdicts)
        total += len(verdicts)
        per_prompt[prompt] = {"colour": sum(c for c, _ in hits) / len(hits),
                              "shape": sum(s for _, s in hits) / len(hits)}
    return ConceptScore(len(targets), total, colour / total, shape / total, both / total, rejected / total, per_prompt)
