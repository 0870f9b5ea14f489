"""Small image folders for tests and examples: coloured shapes with captions, from a seed."""

from __future__ import annotations

# Imports inside functions: PIL only when images are drawn (the train bench imports this module
# when its parser is built).
import json
import random
from pathlib import Path

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
           "cyan": (40, 210, 220), "magenta": (210, 50, 200)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(size: int, colour: str, shape: str, rng: random.Random):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    radius = rng.uniform(0.22, 0.34) * size
    cx, cy = rng.uniform(radius, size - radius), rng.uniform(radius, size - radius)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    return image


def write_shapes_folder(folder: Path, count: int, colour: str = "red", shape: str = "circle", size: int = 32,
                        seed: int = 0, captions: str = "sidecar") -> Path:
    """``count`` PNGs of one coloured shape, captioned 'a <colour> <shape>' (sidecar or jsonl)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        name = f"{shape}-{index:03d}.png"
        draw_shape(size, colour, shape, rng).save(folder / name)
        caption = f"a {colour} {shape}"
        if captions == "sidecar":
            (folder / name).with_suffix(".txt").write_text(caption)
        elif captions == "jsonl":
            rows.append(json.dumps({"file_name": name, "text": caption}))
    if rows:
        (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder
