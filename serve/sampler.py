"""One batched generation for images whose prompts, guidance and seeds differ.

A pipeline call takes one guidance scale and one negative prompt per call; a batch of requests
has one of each per image. The base's model family (lorafleet/families) encodes the prompts and
runs the denoising loop with guidance as a per-image tensor, in the order the family's own
pipeline runs its pieces. An image depends only on its own prompt, negative prompt, guidance and
seed: run alone or in a batch it comes out the same (to float rounding of batched matrix products).

The rows the models see repeat the image order: the text encoders get one row per image (prompts,
then negative prompts in a second call); a UNet ``[unconditional..., conditional...]`` when
guidance is on; a transformer with a guidance embedding one row per image per call.
``serve/routing.py`` relies on that.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from lorafleet.accelerator import seeded_generators
from lorafleet.families import BatchShape, ImageSpec, family_of_pipeline

__all__ = ["BatchShape", "ImageSpec", "sample_images"]


@torch.inference_mode()
def sample_images(pipe, shape: BatchShape, images: list[ImageSpec],
                  between_steps: Callable[[], None] | None = None, device: torch.device | None = None) -> np.ndarray:
    """Images ``[n, height, width, 3]`` float32 in [0, 1], one per spec, from one batched loop;
    ``between_steps`` is called at every step boundary (another pass may run there). ``device``:
    where the pipeline runs, if the caller knows (else ``pipe._execution_device``, which walks
    every module to find out)."""
    if device is None:
        device = pipe._execution_device
    family = family_of_pipeline(pipe)
    negatives = [image.negative_prompt for image in images] if shape.guided else None
    conditioning = family.encode(pipe, [image.prompt for image in images], negatives, device, shape.height,
                                 shape.width)
    generators = seeded_generators([image.seed for image in images])
    latents = family.denoise(pipe, shape, images, conditioning, generators, between_steps)
    decoded = family.decode(pipe, latents, shape.height, shape.width)
    output = pipe.image_processor.postprocess(decoded, output_type="np", do_denormalize=[True] * len(images))
    return np.asarray(output, dtype=np.float32)
