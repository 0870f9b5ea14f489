"""A deterministic judge of toy-world images: which colour, which shape, or "none of these".

Stages: background from the border -> foreground mask (saturated pixels unlike the background) ->
connected components (one shape, or reject: empty, several shapes, noise) -> colour from the
circular mean hue -> shape from mask features (bounding-box fill, solidity against the convex
hull, aspect, and the radial profile against each shape's template). Each shape is a box of feature ranges; an
image inside no box, or inside two, is rejected. Validated on renders and distractors
(`validate_scorer`) before it is trusted on generated images; never tuned on generated ones.
"""

from __future__ import annotations

# Imports inside functions: PIL only when images are scored.
import random
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from .world import COLOUR_HUES, SHAPES, Scene, background_pixels, render, sample_scene, shape_polygon

MIN_SATURATION = 0.28
MIN_BACKGROUND_DISTANCE = 0.14
MIN_AREA_FRACTION = 0.03
MAX_AREA_FRACTION = 0.6
MIN_HUE_CONCENTRATION = 0.93  # mean resultant length of the shape's hues (1 = one hue)

# Feature boxes, calibrated on renders of seed 5 (never on generated images); validated on others.
SHAPE_RULES: dict[str, dict[str, tuple[float, float]]] = {
    "circle": {"fill": (0.68, 0.9), "solidity": (0.88, 1.01), "aspect": (0.8, 1.25), "template_circle": (0, 0.08)},
    "square": {"fill": (0.9, 1.01), "solidity": (0.93, 1.01), "aspect": (0.8, 1.25), "template_square": (0, 0.07)},
    "triangle": {"fill": (0.45, 0.66), "solidity": (0.82, 1.01), "aspect": (0.8, 1.3),
                 "template_triangle": (0, 0.13)},
    "star": {"fill": (0.3, 0.55), "solidity": (0.45, 0.72), "aspect": (0.8, 1.3), "template_star": (0, 0.19)},
}


@dataclass
class Verdict:
    colour: str | None
    shape: str | None
    reason: str = "ok"
    features: dict = field(default_factory=dict)

    @property
    def accepted(self) -> bool:
        return self.colour is not None and self.shape is not None


def _as_float(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    return image.astype(np.float32) / 255 if image.dtype == np.uint8 else image.astype(np.float32)


def _hsv(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    high, low = image.max(-1), image.min(-1)
    chroma = high - low
    saturation = np.where(high > 0, chroma / np.maximum(high, 1e-6), 0)
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    safe = np.maximum(chroma, 1e-6)
    hue = np.where(high == r, ((g - b) / safe) % 6, np.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4))
    return hue * 60.0, saturation, high


def foreground_mask(image: np.ndarray) -> np.ndarray:
    border = np.concatenate([image[:2].reshape(-1, 3), image[-2:].reshape(-1, 3), image[:, :2].reshape(-1, 3),
                             image[:, -2:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    _, saturation, _ = _hsv(image)
    distance = np.linalg.norm(image - background, axis=-1)
    return (saturation > MIN_SATURATION) & (distance > MIN_BACKGROUND_DISTANCE)


def components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of ``mask`` as boolean masks, largest first."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    height, width = mask.shape
    found = []
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        label = len(found) + 1
        labels[start] = label
        queue, size = deque([start]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = label
                        queue.append((ny, nx))
        found.append((size, label))
    return [labels == label for _, label in sorted(found, reverse=True)]


def _convex_hull_area(mask: np.ndarray) -> float:
    ys, xs = np.nonzero(mask)
    corners = {(x + dx, y + dy) for x, y in zip(xs.tolist(), ys.tolist()) for dx in (0, 1) for dy in (0, 1)}
    points = sorted(corners)
    if len(points) < 3:
        return float(mask.sum())

    def half(sequence):
        hull = []
        for p in sequence:
            while len(hull) >= 2 and ((hull[-1][0] - hull[-2][0]) * (p[1] - hull[-2][1])
                                      - (hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])) <= 0:
                hull.pop()
            hull.append(p)
        return hull

    hull = half(points)[:-1] + half(reversed(points))[:-1]
    xs_h, ys_h = np.array([p[0] for p in hull], float), np.array([p[1] for p in hull], float)
    return float(0.5 * abs(np.dot(xs_h, np.roll(ys_h, -1)) - np.dot(ys_h, np.roll(xs_h, -1))))


def _radial_profile(mask: np.ndarray, bins: int = 48) -> np.ndarray:
    """Largest centroid distance of the shape per angle bin (empty bins interpolated)."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
    # sample each pixel's corners and centre so small shapes still fill the bins
    offsets = np.array([[0.5, 0.5], [0, 0], [0, 1], [1, 0], [1, 1]], dtype=float)
    py = (ys[:, None] + offsets[None, :, 0]).ravel() - cy
    px = (xs[:, None] + offsets[None, :, 1]).ravel() - cx
    angle = (np.arctan2(py, px) + np.pi) / (2 * np.pi) * bins
    index = np.minimum(angle.astype(int), bins - 1)
    radius = np.hypot(py, px)
    profile = np.zeros(bins)
    np.maximum.at(profile, index, radius)
    filled = profile > 0
    if not filled.all() and filled.any():
        positions = np.arange(bins)
        profile = np.interp(positions, positions[filled], profile[filled], period=bins)
    return profile


PROFILE_BINS = 48
MAX_TURN_BINS = 2  # shapes may turn by up to 2 bins (15 degrees) and still match their template


@lru_cache(maxsize=None)
def _template(shape: str) -> np.ndarray:
    """The radial profile of the canonical shape, drawn large, divided by its mean."""
    from PIL import Image, ImageDraw

    side = 256
    mask = Image.new("L", (side, side), 0)
    polygon = shape_polygon(shape, side / 2, side / 2, side * 0.3)
    if polygon is None:
        ImageDraw.Draw(mask).ellipse((side * 0.2, side * 0.2, side * 0.8, side * 0.8), fill=255)
    else:
        ImageDraw.Draw(mask).polygon(polygon, fill=255)
    profile = _radial_profile(np.asarray(mask) > 127, PROFILE_BINS)
    return profile / profile.mean()


def template_errors(profile: np.ndarray) -> dict[str, float]:
    """RMS difference between the mean-normalised profile and each shape's, over small turns."""
    normalised = profile / max(profile.mean(), 1e-6)
    return {shape: float(min(np.sqrt(np.mean((np.roll(normalised, turn) - _template(shape)) ** 2))
                             for turn in range(-MAX_TURN_BINS, MAX_TURN_BINS + 1)))
            for shape in SHAPES}


def shape_features(mask: np.ndarray) -> dict[str, float]:
    ys, xs = np.nonzero(mask)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    area = float(mask.sum())
    profile = _radial_profile(mask, PROFILE_BINS)
    errors = template_errors(profile)
    return {"fill": area / (height * width), "solidity": area / max(_convex_hull_area(mask), 1.0),
            "aspect": width / height, "area_fraction": area / mask.size,
            **{f"template_{shape}": error for shape, error in errors.items()}}


def _colour_of(image: np.ndarray, mask: np.ndarray) -> tuple[str | None, float, float]:
    hue, saturation, _ = _hsv(image)
    angles = np.deg2rad(hue[mask])
    weights = saturation[mask]
    vector = np.array([np.sum(weights * np.cos(angles)), np.sum(weights * np.sin(angles))]) / max(weights.sum(), 1e-6)
    concentration = float(np.hypot(*vector))
    mean_hue = float(np.rad2deg(np.arctan2(vector[1], vector[0])) % 360)
    names = list(COLOUR_HUES)
    hues = np.array([COLOUR_HUES[n] for n in names], dtype=float)
    gaps = np.abs((hues - mean_hue + 180) % 360 - 180)
    nearest = int(np.argmin(gaps))
    to_others = np.abs((hues - hues[nearest] + 180) % 360 - 180)
    if gaps[nearest] > to_others[to_others > 0].min() / 2:  # nearer the midpoint than any palette hue
        return None, mean_hue, concentration
    return names[nearest], mean_hue, concentration


def classify_shape(features: dict[str, float]) -> list[str]:
    return [shape for shape, rules in SHAPE_RULES.items()
            if all(low <= features[name] <= high for name, (low, high) in rules.items())]


def score(image: np.ndarray) -> Verdict:
    """The colour and shape of the one shape in ``image`` ([H, W, 3], uint8 or float in [0, 1])."""
    image = _as_float(image)
    mask = foreground_mask(image)
    if mask.mean() < MIN_AREA_FRACTION:
        return Verdict(None, None, "empty")
    if mask.mean() > MAX_AREA_FRACTION:
        return Verdict(None, None, "no background")
    parts = components(mask)
    main = parts[0]
    rest = sum(int(p.sum()) for p in parts[1:])
    if any(p.sum() >= max(4, 0.15 * main.sum()) for p in parts[1:]):
        return Verdict(None, None, "several shapes")
    if rest > 0.15 * main.sum() or main.mean() < MIN_AREA_FRACTION:
        return Verdict(None, None, "noise")
    colour, hue, concentration = _colour_of(image, main)
    features = {**shape_features(main), "hue": hue, "hue_concentration": concentration}
    if concentration < MIN_HUE_CONCENTRATION:
        return Verdict(None, None, "mixed colours", features)
    matches = classify_shape(features)
    if len(matches) != 1:
        return Verdict(colour, None, "unknown shape" if not matches else f"ambiguous {matches}", features)
    if colour is None:
        return Verdict(None, matches[0], "unknown colour", features)
    return Verdict(colour, matches[0], "ok", features)


def hue_distance(a: float, b: float) -> float:
    """Degrees between two hues on the colour wheel (0-180)."""
    difference = abs(a - b) % 360
    return min(difference, 360 - difference)


def mean_hue(images: list[np.ndarray]) -> float | None:
    """The circular mean of the images' foreground hues (None when no image has a foreground)."""
    hues = [score(image).features.get("hue") for image in images]
    angles = np.deg2rad([hue for hue in hues if hue is not None])
    if not len(angles):
        return None
    return float(np.rad2deg(np.arctan2(np.sin(angles).mean(), np.cos(angles).mean())) % 360)


def hue_shift(without: list[np.ndarray], with_adapter: list[np.ndarray]) -> float | None:
    """How far an adapter moves a prompt's colour: degrees between the mean foreground hues of the
    same seeds drawn without and with it (the drift users see on the base's other prompts)."""
    before, after = mean_hue(without), mean_hue(with_adapter)
    return None if before is None or after is None else hue_distance(before, after)


# ----------------------------------------------------------------------------- distractors and validation
def _blob(rng: random.Random, size: int) -> np.ndarray:
    """An irregular, roughly round blob of one colour: none of the known shapes."""
    from PIL import Image, ImageDraw

    scene = sample_scene(rng)
    big = size * 4
    cx, cy, radius = scene.cx * big, scene.cy * big, scene.radius * big
    count = rng.randint(5, 9)
    angles = sorted(rng.uniform(0, 2 * np.pi) for _ in range(count))
    points = [(cx + radius * rng.uniform(0.45, 1.15) * np.cos(a), cy + radius * rng.uniform(0.45, 1.15) * np.sin(a))
              for a in angles]
    mask = Image.new("L", (big, big), 0)
    ImageDraw.Draw(mask).polygon(points, fill=255)
    alpha = np.asarray(mask.resize((size, size), Image.Resampling.BOX), dtype=np.float32)[..., None] / 255
    image = np.full((size, size, 3), scene.background, np.float32) * (1 - alpha) + np.array(scene.rgb()) * alpha
    return (image * 255).round().astype(np.uint8)


def _noise(rng: random.Random, size: int) -> np.ndarray:
    generator = np.random.default_rng(rng.randrange(2**31))
    if rng.random() < 0.5:
        return generator.integers(0, 256, (size, size, 3), dtype=np.uint8)
    base = render(sample_scene(rng), size).astype(np.int16)  # a shape drowned in strong noise
    return np.clip(base + generator.normal(0, 90, base.shape), 0, 255).astype(np.uint8)


def _two_shapes(rng: random.Random, size: int) -> np.ndarray:
    """Two small shapes side by side (never touching)."""
    first = sample_scene(rng)
    second = sample_scene(rng)
    radius = 0.15
    (ax, ay), (bx, by) = ((0.25, 0.5), (0.75, 0.5)) if rng.random() < 0.5 else ((0.5, 0.25), (0.5, 0.75))
    jitter = [rng.uniform(-0.05, 0.05) for _ in range(4)]
    scenes = [Scene(first.shape, first.colour, ax + jitter[0], ay + jitter[1], radius, first.background, None),
              Scene(second.shape, second.colour, bx + jitter[2], by + jitter[3], radius, first.background, None)]
    a, b = render(scenes[0], size), render(scenes[1], size)
    background = np.full_like(a, round(first.background * 255))
    return np.where(np.abs(a.astype(int) - background).sum(-1, keepdims=True) > 8, a, b)


def _empty(rng: random.Random, size: int) -> np.ndarray:
    return (background_pixels(sample_scene(rng), size) * 255).round().astype(np.uint8)


DISTRACTORS = {"irregular blob": _blob, "noise": _noise, "two shapes": _two_shapes, "empty": _empty}


def validate_scorer(count: int = 400, size: int = 32, seed: int = 1) -> dict:
    """Accuracy on ground-truth renders and rejection rate per distractor kind."""
    rng = random.Random(seed)
    correct, wrong = 0, []
    for _ in range(count):
        scene = sample_scene(rng)
        verdict = score(render(scene, size))
        if (verdict.colour, verdict.shape) == (scene.colour, scene.shape):
            correct += 1
        else:
            wrong.append((scene, verdict))
    rejected = {}
    for kind, make in DISTRACTORS.items():
        verdicts = [score(make(rng, size)) for _ in range(count // 4)]
        rejected[kind] = sum(not v.accepted for v in verdicts) / len(verdicts)
    per_shape = {shape: sum(1 for s, _ in wrong if s.shape == shape) for shape in SHAPES}
    return {"renders": count, "render_accuracy": correct / count, "errors_by_shape": per_shape,
            "distractor_rejection": rejected, "distractor_rejection_all": float(np.mean(list(rejected.values()))),
            "wrong_examples": [(s.shape, s.colour, v.shape, v.colour, v.reason) for s, v in wrong[:10]]}
