"""The toy world and its scorer: deterministic renders, and a scorer validated before it is trusted."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lorafleet.toyworld.scorer import DISTRACTORS, score, validate_scorer
from lorafleet.toyworld.world import COLOUR_HUES, SHAPES, caption, render, sample_scene, write_dataset


def test_scenes_and_renders_are_deterministic_from_the_seed(tmp_path):
    first = write_dataset(tmp_path / "a", 12, seed=3)
    second = write_dataset(tmp_path / "b", 12, seed=3)
    assert first == second
    for path in sorted((tmp_path / "a").glob("*")):
        assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes()
    assert len(set(COLOUR_HUES)) >= 6 and {"circle", "square", "triangle"} <= set(SHAPES)


def test_captions_say_size_colour_shape_and_place():
    scene = sample_scene(random.Random(0))
    words = caption(scene).split()
    assert words[0] == "a" and scene.colour in words and scene.shape in words and scene.size_word in words
    assert caption(scene, "short") == f"a {scene.colour} {scene.shape}"


@pytest.mark.parametrize("size", [32, 64])
def test_scorer_is_right_on_renders_and_rejects_distractors(size):
    report = validate_scorer(count=400, size=size, seed=2024)  # a seed the rules were not calibrated on
    assert report["render_accuracy"] >= 0.98, report
    for kind, rejected in report["distractor_rejection"].items():
        assert rejected >= 0.95, (kind, report)


def test_the_scorer_can_say_wrong():
    scene = sample_scene(random.Random(1), shapes=["square"], colours=["red"])
    verdict = score(render(scene))
    assert (verdict.colour, verdict.shape) == ("red", "square")
    blue = render(sample_scene(random.Random(1), shapes=["circle"], colours=["blue"]))
    assert (score(blue).colour, score(blue).shape) == ("blue", "circle")
    assert not score(DISTRACTORS["empty"](random.Random(2), 32)).accepted
    assert not score(np.zeros((32, 32, 3), np.uint8)).accepted


def test_rebalancing_gives_under_drawn_colours_more_images_and_reproduces_the_recipe(tmp_path):
    from lorafleet.toyworld.base_model import BASE_COLOURS
    from lorafleet.toyworld.correction import BALANCED, REBALANCED, balanced_dataset, rebalanced_counts

    labels, uniform = list(BASE_COLOURS), {colour: 1 / len(BASE_COLOURS) for colour in BASE_COLOURS}
    # The two calibration audits recorded in correction.py (readable images per colour)
    first = rebalanced_counts(BALANCED, dict(zip(labels, [8, 12, 11, 9, 24, 20, 18])), uniform)
    assert first == {"red": 10, "orange": 8, "yellow": 9, "green": 10, "blue": 6, "purple": 6, "magenta": 7}
    assert rebalanced_counts(first, dict(zip(labels, [9, 13, 12, 14, 15, 16, 18])), uniform) == REBALANCED
    assert rebalanced_counts(BALANCED, dict.fromkeys(labels, 5), uniform) == BALANCED  # already uniform: unchanged
    never = rebalanced_counts(BALANCED, {**dict.fromkeys(labels, 10), "red": 0}, uniform)
    assert never["red"] == max(never.values()) and sum(never.values()) == sum(BALANCED.values())
    with pytest.raises(ValueError, match="read no image"):
        rebalanced_counts(BALANCED, dict.fromkeys(labels, 0), uniform)
    folder = balanced_dataset(tmp_path / "data", regularization=4)
    instance = [p for p in folder.glob("*.txt") if p.read_text() == "a [trigger]"]
    assert len(instance) == sum(REBALANCED.values())
