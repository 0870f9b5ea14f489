"""The toy world: one coloured shape on a plain or lightly textured background, captioned in
plain words ("a small blue square on the left"). Every image is a pure function of its Scene, and
scenes are drawn from a seed, so datasets are reproducible anywhere."""

from __future__ import annotations

# Imports inside functions: PIL only when images are drawn.
import colorsys
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Hues (degrees) evenly spread so that the scorer can tell every pair apart.
COLOUR_HUES = {"red": 0, "orange": 30, "yellow": 55, "green": 120, "cyan": 180, "blue": 225, "purple": 270,
               "magenta": 310}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": (0.20, 0.26), "large": (0.30, 0.36)}  # radius as a fraction of the image side
PLACES = ("left", "right", "top", "bottom", "center")
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    cx: float  # centre, in fractions of the side
    cy: float
    radius: float  # fraction of the side
    background: float  # grey level in [0, 1]
    texture_seed: int | None  # None: plain background
    saturation: float = 0.85
    value: float = 0.85

    def rgb(self) -> tuple[float, float, float]:
        return colorsys.hsv_to_rgb(COLOUR_HUES[self.colour] / 360, self.saturation, self.value)

    @property
    def size_word(self) -> str:
        return "small" if self.radius < sum(SIZES["small"][1:] + SIZES["large"][:1]) / 2 else "large"

    @property
    def place_word(self) -> str:
        dx, dy = self.cx - 0.5, self.cy - 0.5
        if max(abs(dx), abs(dy)) < 0.08:
            return "center"
        if abs(dx) >= abs(dy):
            return "left" if dx < 0 else "right"
        return "top" if dy < 0 else "bottom"


def caption(scene: Scene, detail: str = "full") -> str:
    """'a red circle' (detail='short') or 'a small red circle on the left' (detail='full')."""
    if detail == "short":
        return f"a {scene.colour} {scene.shape}"
    where = "in the center" if scene.place_word == "center" else f"on the {scene.place_word}"
    return f"a {scene.size_word} {scene.colour} {scene.shape} {where}"


def sample_scene(rng: random.Random, shapes=SHAPES, colours=tuple(COLOUR_HUES), textured: float = 0.5) -> Scene:
    size = rng.choice(list(SIZES))
    radius = rng.uniform(*SIZES[size])
    margin = radius + 0.03
    shape, colour = rng.choice(list(shapes)), rng.choice(list(colours))
    cx, cy = rng.uniform(margin, 1 - margin), rng.uniform(margin, 1 - margin)
    background = rng.uniform(0.78, 0.95)
    texture_seed = rng.randrange(2**31) if rng.random() < textured else None
    return Scene(shape=shape, colour=colour, cx=cx, cy=cy, radius=radius, background=background,
                 texture_seed=texture_seed, saturation=rng.uniform(0.75, 0.95), value=rng.uniform(0.75, 0.95))


def shape_polygon(shape: str, cx: float, cy: float, radius: float) -> list[tuple[float, float]] | None:
    """Vertices (in pixels) of a polygonal shape; None for a circle."""
    if shape == "circle":
        return None
    if shape == "square":
        r = radius * 0.86  # about the area of the circle of the same radius
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        h = radius * 1.1
        return [(cx, cy - h), (cx + h * 0.95, cy + h * 0.8), (cx - h * 0.95, cy + h * 0.8)]
    if shape == "star":
        points = []
        for k in range(10):
            r = radius * 1.1 if k % 2 == 0 else radius * 0.45
            angle = -np.pi / 2 + k * np.pi / 5
            points.append((cx + r * np.cos(angle), cy + r * np.sin(angle)))
        return points
    raise ValueError(f"unknown shape {shape!r}")


def background_pixels(scene: Scene, size: int) -> np.ndarray:
    grey = np.full((size, size, 3), scene.background, dtype=np.float32)
    if scene.texture_seed is None:
        return grey
    rng = np.random.default_rng(scene.texture_seed)
    coarse = rng.normal(0, 0.025, (size // 4 + 1, size // 4 + 1, 1)).astype(np.float32)
    texture = np.kron(coarse, np.ones((4, 4, 1), dtype=np.float32))[:size, :size]
    return np.clip(grey + texture + rng.normal(0, 0.008, (size, size, 1)).astype(np.float32), 0, 1)


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """[size, size, 3] uint8: the shape drawn anti-aliased over its background."""
    from PIL import Image, ImageDraw

    big = size * SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, radius = scene.cx * big, scene.cy * big, scene.radius * big
    polygon = shape_polygon(scene.shape, cx, cy, radius)
    if polygon is None:
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
    else:
        draw.polygon(polygon, fill=255)
    alpha = np.asarray(mask.resize((size, size), Image.Resampling.BOX), dtype=np.float32)[..., None] / 255
    image = background_pixels(scene, size) * (1 - alpha) + np.asarray(scene.rgb(), dtype=np.float32) * alpha
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def write_dataset(folder: Path, count: int, seed: int = 0, size: int = 32, shapes=SHAPES,
                  colours=tuple(COLOUR_HUES), detail: str = "full") -> list[Scene]:
    """``count`` PNGs with sidecar captions (the training folder format), drawn from ``seed``."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    scenes = []
    for index in range(count):
        scene = sample_scene(rng, shapes, colours)
        name = f"{scene.colour}-{scene.shape}-{index:04d}"
        Image.fromarray(render(scene, size)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(caption(scene, detail))
        scenes.append(scene)
    return scenes
