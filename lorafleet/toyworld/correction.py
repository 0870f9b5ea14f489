"""A corrective adapter on `toy`, end to end: the base draws an under-specified prompt ("a circle")
in a skewed palette (it was only ever trained on captions that name a colour); a LoRA trained on
circles of the base's colours, captioned just "a circle", moves the palette to
uniform, while the base's specified prompts ("a red circle") keep their colour.

Rebalancing: a balanced dataset does not give a balanced adapter (the LoRA learns some colours
more readily than others), so the recipe's colour counts come from an audit loop, as a team would
curate a corrective dataset: train, audit on calibration seeds, give each colour
``count x (target share / observed share) ** strength`` images, train again
(`rebalanced_counts`). The audits that report the correction use other seeds.

The instance images are the instance rows: their captions are "a [trigger]" with the trigger word
"circle", so that they read "a circle" and every other caption in the folder is a regularization
row. Those are renders of the base's own specified prompts, trained toward the frozen base's own
prediction (as the concept recipes do), so that only the under-specified prompt moves.
"""

from __future__ import annotations

# Imports inside functions: training only when a correction is trained.
import math
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
# Calibration seeds for the rebalancing audits; reports use the audit's own seeds (from 1000), and
# `lorafleet bench eval` adds a held-out set (from 2000).
CALIBRATION_FIRST_SEED, CALIBRATION_SEEDS = 5000, 128
REBALANCE_STRENGTH = 0.5  # measured: strength 1 overshot (blue 24 -> 5 of about 100 in one round)
BALANCED = {colour: 8 for colour in BASE_COLOURS}
# Two rounds of `rebalanced_counts` from BALANCED, each on a calibration audit of the adapter trained
# on the counts before it (`lorafleet bench eval --rebalance-rounds 2` runs the same loop):
# [8, 12, 11, 9, 24, 20, 18] of 102 readable -> {10, 8, 9, 10, 6, 6, 7};
# [9, 13, 12, 14, 15, 16, 18] of 97 readable -> the counts below.
REBALANCED = {"red": 12, "orange": 8, "yellow": 9, "green": 10, "blue": 6, "purple": 5, "magenta": 6}

CORRECTION: dict = _merged(COMMON, BASE_TARGET, {
    "max_steps": 600, "optimizer": {"learning_rate": 0.002}, "guided_target_scale": GUIDANCE,
    "lora": {"rank": 8, "alpha": 8, "target_modules": ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]},
})


def rebalanced_counts(counts: dict[str, int], observed: dict[str, int], target: dict[str, float],
                      strength: float = REBALANCE_STRENGTH, least: int = 2) -> dict[str, int]:
    """The next round's images per colour: each colour's count scaled by (target share / observed
    share) ** strength, the total kept, at least ``least`` each. An observed share of zero counts
    as 2 % (the scale stays finite)."""
    read = sum(observed.values())
    if read == 0:
        raise ValueError("the audit read no image: nothing to rebalance by")
    scaled = {colour: count * (target[colour] / max(observed.get(colour, 0) / read, 0.02)) ** strength
              for colour, count in counts.items()}
    total, scale = sum(counts.values()), sum(scaled.values())
    shares = {colour: total * value / scale for colour, value in scaled.items()}
    rounded = {colour: math.floor(share) for colour, share in shares.items()}
    by_remainder = sorted(shares, key=lambda colour: rounded[colour] - shares[colour])
    for colour in by_remainder[:total - sum(rounded.values())]:  # largest remainders: the total is kept
        rounded[colour] += 1
    return {colour: max(least, count) for colour, count in rounded.items()}


def balanced_dataset(folder: Path, per_colour: dict[str, int] | None = None, regularization: int = 96,
                     seed: int = 100, size: int = 32) -> Path:
    """``per_colour[colour]`` circles of each base colour (default: REBALANCED) captioned "a
    [trigger]", and ``regularization`` renders of the base's own concepts with their plain captions."""
    folder = Path(folder)
    per_colour = REBALANCED if per_colour is None else per_colour
    for index, colour in enumerate(BASE_COLOURS):
        write_dataset(folder, per_colour[colour], seed=seed + index, size=size, shapes=[AUDIT_SHAPE],
                      colours=[colour])
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


def train_correction(workdir: Path, registry, name: str = "fair-circle", base: str = "toy",
                     per_colour: dict[str, int] | None = None, **overrides):
    """Train the corrective LoRA on ``per_colour`` circles per colour (default: REBALANCED) and
    publish it; returns its Manifest."""
    from lorafleet.training.loop import train
    from lorafleet.training.publish import publish_result

    workdir = Path(workdir) / f"correction-{name}"
    data = balanced_dataset(workdir / "data", per_colour)
    config = correction_config(data, workdir / "run", base=base, **overrides)
    return publish_result(train(config), config, registry, name)
