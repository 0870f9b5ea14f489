"""Turning examples into training tensors: latents (cached when valid) and text embeddings.

Every random choice of step N comes from a generator seeded by (seed, N), so a resumed run
draws exactly the batches, noise and timesteps the uninterrupted run would have drawn.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from lorafleet.families import family_of_pipeline

from .config import TrainConfig
from .data import Example, augment, bucket_for, open_image, random_augmentation, resize_and_crop_recorded, to_array


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 101 + stream) % 2**63)


@dataclass
class Batch:
    latents: torch.Tensor  # [batch, latent channels, h/f, w/f]
    captions: list[str]
    regularization: torch.Tensor  # [batch] bool: rows that keep the base's behaviour (config.RegularizationConfig)
    weights: torch.Tensor  # [batch] loss weight per row
    time_ids: torch.Tensor | None = None  # [batch, 6]: original size, crop top-left, target size (SDXL)

    def rows(self, rows: torch.Tensor) -> Batch:
        """The batch restricted to ``rows`` (a bool mask)."""
        return Batch(self.latents[rows], [c for c, keep in zip(self.captions, rows.tolist()) if keep],
                     self.regularization[rows.cpu()], self.weights[rows.cpu()],
                     None if self.time_ids is None else self.time_ids[rows.cpu()])


def square_time_ids(rows: int, side: int) -> torch.Tensor:
    """Time ids of uncropped square images at their own size (class images, the DreamBooth prior)."""
    return torch.tensor([[side, side, 0, 0, side, side]] * rows, dtype=torch.float32)


@dataclass
class _Group:
    """Examples trained at one size (the square resolution, or one aspect-ratio bucket)."""

    size: tuple[int, int]  # (width, height) in pixels
    indices: list[int]
    weights: torch.Tensor  # [len(indices)]
    latents: torch.Tensor | None = None  # [len(indices), 4, h/f, w/f] when cached
    time_ids: torch.Tensor | None = None  # [len(indices), 6] when cached


def sampling_weights(examples: list[Example], regularization_share: float | None) -> list[float]:
    """Each example's chance to be drawn (up to a constant): its own weight, and with a
    ``regularization_share`` the regularization examples scaled to that share of the total."""
    weights = [example.weight for example in examples]
    regularization = sum(w for w, e in zip(weights, examples) if e.regularization)
    instance = sum(weights) - regularization
    if regularization_share is None or not regularization or not instance:
        return weights
    scale = {True: regularization_share / regularization, False: (1 - regularization_share) / instance}
    return [w * scale[e.regularization] for w, e in zip(weights, examples)]


class BatchSource:
    def __init__(self, pipe, examples: list[Example], config: TrainConfig, device: torch.device):
        self.pipe = pipe
        self.examples = examples
        self.config = config
        self.device = device
        self.family = family_of_pipeline(pipe)
        self.groups = self._groups()
        if config.data.cache_latents and not random_augmentation(config.data):
            for group in self.groups:
                group.latents = self._encode_group(group)

    def _groups(self) -> list[_Group]:
        resolution = self.config.data.resolution
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, example in enumerate(self.examples):
            size = bucket_for(example.aspect, resolution, self.family.size_multiple) if self.config.data.buckets \
                else (resolution, resolution)
            by_size.setdefault(size, []).append(index)
        weights = sampling_weights(self.examples, self.config.regularization.share)
        return [_Group(size, indices, torch.tensor([weights[i] for i in indices], dtype=torch.float64))
                for size, indices in sorted(by_size.items())]

    def _pixels(self, example: Example, size: tuple[int, int], rng: random.Random) -> tuple[np.ndarray, tuple]:
        image, time_ids = resize_and_crop_recorded(open_image(example.path, max_bytes=self.config.data.max_file_bytes),
                                                   size, self.config.data.crop, rng)
        return augment(to_array(image), self.config.data, rng), time_ids

    def _pixels_of(self, indices: list[int], size: tuple[int, int], rng: random.Random):
        pixels, time_ids = zip(*(self._pixels(self.examples[i], size, rng) for i in indices))
        return np.stack(pixels), torch.tensor(time_ids, dtype=torch.float32)

    @torch.no_grad()
    def _encode(self, pixels: np.ndarray, generator: torch.Generator) -> torch.Tensor:
        images = torch.from_numpy(pixels).to(self.device, self.pipe.vae.dtype)  # [n, 3, H, W] in [-1, 1]
        distribution = self.pipe.vae.encode(images).latent_dist
        noise = torch.randn(distribution.mean.shape, generator=generator).to(self.device, distribution.mean.dtype)
        return self.family.latents_of_images(self.pipe, distribution.mean + distribution.std * noise)

    def _encode_group(self, group: _Group) -> torch.Tensor:
        rng = random.Random(self.config.seed)
        pixels, group.time_ids = self._pixels_of(group.indices, group.size, rng)
        return self._encode(pixels, torch.Generator().manual_seed(self.config.seed))

    def _pick(self, generator: torch.Generator) -> tuple[_Group, list[int]]:
        """A group (by its share of the total weight), then positions in it (by weight)."""
        totals = torch.tensor([float(g.weights.sum()) for g in self.groups])
        group = self.groups[int(torch.multinomial(totals, 1, generator=generator))]
        positions = torch.multinomial(group.weights, self.config.batch_size, replacement=True, generator=generator)
        return group, positions.tolist()

    def batch(self, step: int, micro: int) -> Batch:
        generator = step_generator(self.config.seed, step, micro)
        group, positions = self._pick(generator)
        if group.latents is not None:
            latents, time_ids = group.latents[positions], group.time_ids[positions]
        else:
            rng = random.Random(int(torch.randint(2**31, (1,), generator=generator)))
            pixels, time_ids = self._pixels_of([group.indices[p] for p in positions], group.size, rng)
            latents = self._encode(pixels, generator)
        examples = [self.examples[group.indices[p]] for p in positions]
        captions = [self._maybe_drop(example.caption, generator) for example in examples]
        regularization = torch.tensor([self._regularizes(example, caption) for example, caption in
                                       zip(examples, captions)], dtype=torch.bool)
        weights = torch.where(regularization, self.config.regularization.weight, 1.0)
        return Batch(latents, captions, regularization, weights, time_ids)

    @property
    def cached(self) -> torch.Tensor | None:
        """Cached latents at the square training size (for evaluation), if any."""
        square = (self.config.data.resolution, self.config.data.resolution)
        return next((g.latents for g in self.groups if g.size == square), None)

    def _regularizes(self, example: Example, caption: str) -> bool:
        """A regularization example; with ``regularization.target=base`` also any row whose caption
        was dropped: the empty prompt names no trigger, so the adapter must leave the base's
        unconditional prediction alone (classifier-free guidance subtracts it from every prompt)."""
        dropped = not caption and bool(example.caption)
        return example.regularization or (dropped and self.config.regularization.target == "base")

    def _maybe_drop(self, caption: str, generator: torch.Generator) -> str:
        dropped = float(torch.rand((1,), generator=generator)) < self.config.data.caption_dropout
        return "" if dropped else caption


class ClassBatchSource:
    """DreamBooth's class images: generated by the base itself once, cached as latents. With
    ``regularization.target=base`` their rows learn the base's prediction, like regularization rows."""

    def __init__(self, latents: torch.Tensor, prompt: str, config: TrainConfig):
        self.latents = latents  # [n, 4, h, w], generated at data.resolution
        self.prompt = prompt
        self.config = config

    def batch(self, step: int, micro: int) -> Batch:
        generator = step_generator(self.config.seed, step, 1000 + micro)
        indices = torch.randint(len(self.latents), (self.config.batch_size,), generator=generator).tolist()
        rows = len(indices)  # every row is the base's own prior; its weight is dreambooth.prior_loss_weight
        return Batch(self.latents[indices], [self.prompt] * rows, torch.ones(rows, dtype=torch.bool), torch.ones(rows),
                     square_time_ids(rows, self.config.data.resolution))


class TextEncoder:
    """Captions -> (hidden states, pooled embedding or None), as the base's family conditions its
    denoiser; cached per caption when the text encoders do not train."""

    def __init__(self, pipe, trains: bool, device: torch.device):
        self.pipe = pipe
        self.family = family_of_pipeline(pipe)
        self.trains = trains
        self.device = device
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.trains:
            return self.family.encode_for_training(self.pipe, captions, self.device)
        missing = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if missing:
            with torch.no_grad():
                hidden, pooled = self.family.encode_for_training(self.pipe, missing, self.device)
                for index, caption in enumerate(missing):
                    self._cache[caption] = (hidden[index], None if pooled is None else pooled[index])
        hidden = torch.stack([self._cache[c][0] for c in captions])
        pooled = None if self._cache[captions[0]][1] is None else torch.stack([self._cache[c][1] for c in captions])
        return hidden, pooled
