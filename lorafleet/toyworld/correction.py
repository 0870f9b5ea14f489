"""A corrective adapter on `toy`, end to end: the base draws an under-specified prompt ("a circle")
in a skewed palette (it was only ever trained on captions that name a colour); a LoRA trained on
circles balanced over the base's colours, captioned just "a circle", moves the palette toward
uniform, while the base's specified prompts ("a red circle") keep their colour.

The balanced images are the instance rows: their captions are "a [trigger]" with the trigger word
"circle", so that they read "a circle" and every other caption in the folder is a regularization
row. Those are renders of the base's own specified prompts, trained toward the frozen base's own
prediction (as the concept recipes do), so that only the under-specified prompt moves.
"""

from __future__ import annotations

# Imports inside functions: training only when a correction is trained.
from pathlib import Path

from .base_model import BASE_COLOURS
from .concepts import BASE_TARGET, COMMON, GUIDANCE, _merged, write_regularization_renders
from .world import write_dataset

AUDIT_PROMPT = "a circle"
AUDIT_SHAPE = "circle"
# Measured (`lorafleet bench eval`, docs/benchmarks.md): keys and values only at 300 steps left 73% of
# the images with the adapter unreadable (mixed colours); the whole cross-attention at 600 steps
# leaves about a third. Guidance divides what the adapter learns by the base's unconditional
# distribution (warm colours came out rare at guidance 4, not at 1), so the instance rows are
# trained for guidance at the scale the toy-world draws with (GUIDANCE): KL from uniform 0.232 ->
# 0.149 and unreadable images 22 -> 11 of 64.
CORRECTION: dict = _merged(COMMON, BASE_TARGET, {
    "max_steps": 600, "optimizer": {"learning_rate": 0.002}, "guided_target_scale": GUIDANCE,
    "lora": {"rank": 8, "alpha": 8, "target_modules": ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]},
})


def balanced_dataset(folder: Path, per_colour: int = 8, regularization: int = 96, seed: int = 100,
                     size: int = 32) -> Path:
    """``per_colour`` circles of each base colour captioned "a [trigger]", and ``regularization``
    renders of the base's own concepts with their plain captions."""
    folder = Path(folder)
    for index, colour in enumerate(BASE_COLOURS):
        write_dataset(folder, per_colour, seed=seed + index, size=size, shapes=[AUDIT_SHAPE], colours=[colour])
    for text_file in folder.glob("*.txt"):
        text_file.write_text("a [trigger]")
    write_regularization_renders(folder, regularization, seed - 1, size)
    return folder


def correction_config(data: Path, output_dir: Path, base: str = "toy", seed: int = 0, **overrides):
    """The corrective LoRA's recipe as a validated ``TrainConfig``."""
    from lorafleet.training.config import TrainConfig

    run = {"method": "lora", "base": base, "seed": seed, "output_dir": output_dir,
           "data": {"path": data, "trigger": AUDIT_SHAPE, "trigger_mode": "substitute"}}
    return TrainConfig.model_validate(_merged(run, CORRECTION, overrides))


def train_correction(workdir: Path, registry, name: str = "fair-circle", base: str = "toy", **overrides):
    """Train the corrective LoRA on a balanced dataset and publish it; returns its Manifest."""
    from lorafleet.training.loop import train
    from lorafleet.training.publish import publish_result

    workdir = Path(workdir)
    data = balanced_dataset(workdir / "balanced-data")
    config = correction_config(data, workdir / "balanced-run", base=base, **overrides)
    return publish_result(train(config), config, registry, name)
