"""What a run leaves behind besides the adapter: validation grids, a loss curve, metrics."""

from __future__ import annotations

# Imports inside functions: PIL and transformers only when images or CLIP scores are made.
import json
from pathlib import Path

import numpy as np
import torch

from lorafleet.accelerator import seeded_generators
from lorafleet.families import family_of_pipeline


@torch.no_grad()
def sample_images(pipe, prompts: list[str], seed: int, steps: int = 20) -> list[np.ndarray]:
    """One image per prompt ([height, width, 3] float in [0, 1]), seeded."""
    images = []
    for index, prompt in enumerate(prompts):
        output = pipe(prompt, num_inference_steps=steps, generator=seeded_generators([seed + index]),
                      output_type="np", **family_of_pipeline(pipe).pipeline_call_options(pipe))
        images.append(output.images[0])
    return images


def grid_pixels(rows: list[list[np.ndarray]], scale: int = 4) -> np.ndarray:
    """Rows of equally sized images ([H, W, 3] floats in [0, 1]) as one uint8 image, 2 px apart,
    each enlarged ``scale`` times (nearest neighbour)."""
    tiles = [[(np.clip(img, 0, 1) * 255).round().astype(np.uint8) for img in row] for row in rows]
    height, width = tiles[0][0].shape[:2]
    grid = np.full((len(tiles) * (height + 2), max(len(r) for r in tiles) * (width + 2), 3), 255, np.uint8)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            grid[r * (height + 2): r * (height + 2) + height, c * (width + 2): c * (width + 2) + width] = tile
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def save_grid(rows: list[list[np.ndarray]], path: Path, scale: int = 4) -> Path:
    """Rows of equally sized images as one PNG (each image enlarged ``scale`` times)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid_pixels(rows, scale)).save(path)
    return path


def save_loss_curve(losses: list[float], path: Path, width: int = 480, height: int = 240) -> Path:
    """The loss per step (and a moving average) as a PNG."""
    from PIL import Image, ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    if len(losses) >= 2:
        values = np.asarray(losses, dtype=np.float64)
        window = max(1, len(values) // 20)
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        low, high = float(values.min()), float(values.max()) or 1.0
        span = (high - low) or 1.0

        def points(series):
            return [(20 + i * (width - 40) / max(1, len(series) - 1), height - 20 - (v - low) / span * (height - 40))
                    for i, v in enumerate(series)]

        draw.line(points(values), fill=(180, 180, 220), width=1)
        draw.line(points(smooth), fill=(20, 40, 160), width=2)
        draw.text((24, 4), f"loss {values[0]:.4f} -> {smooth[-1]:.4f} over {len(values)} steps", fill="black")
    image.save(path)
    return path


@torch.no_grad()
def latent_distance(pipe, prompts: list[str], train_latents: torch.Tensor | None, seed: int, steps: int = 20):
    """Mean distance from generated latents to their nearest training latent ([n, 4, h, w]).

    Latents are generated at the training latents' size, whatever the base's native size."""
    if train_latents is None or not prompts:
        return None
    height, width = (side * int(pipe.vae_scale_factor) for side in train_latents.shape[-2:])
    family = family_of_pipeline(pipe)
    distances = []
    for index, prompt in enumerate(prompts):
        latents = pipe(prompt, num_inference_steps=steps, generator=seeded_generators([seed + index]),
                       height=height, width=width, output_type="latent", **family.pipeline_call_options(pipe)).images
        scaling = float(pipe.vae.config.scaling_factor)
        latents = family.latents_of_pipeline_output(pipe, latents, height, width) / scaling
        flat_train = (train_latents / scaling).flatten(1).cpu()
        gaps = torch.cdist(latents.flatten(1).cpu().float(), flat_train.float())  # [1, n_train]
        distances.append(float(gaps.min()))
    return float(np.mean(distances))


def write_metrics(path: Path, metrics: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, default=str))
    return path


def _features(output) -> torch.Tensor:
    """Projected embeddings; transformers 5 wraps them in an output object (pooler_output)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.no_grad()
def clip_score(images: list[np.ndarray], prompts: list[str], model_path: Path) -> float:
    """CLIP score (as torchmetrics defines it: 100 * max(cos(image, text), 0), averaged) with a CLIP
    model from a local folder. Computed here because torchmetrics 1.9 does not read transformers 5's
    feature outputs."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(str(model_path), local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(str(model_path), local_files_only=True)
    pixels = [(np.clip(image, 0, 1) * 255).round().astype(np.uint8) for image in images]
    inputs = processor(text=prompts, images=pixels, return_tensors="pt", padding=True, truncation=True)
    image_features = _features(model.get_image_features(pixel_values=inputs["pixel_values"]))
    text_features = _features(model.get_text_features(input_ids=inputs["input_ids"],
                                                      attention_mask=inputs.get("attention_mask")))
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)  # [n, dim]
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)  # [n, dim]
    cosine = (image_features * text_features).sum(dim=-1)
    return float((100 * cosine.clamp(min=0)).mean())
