"""Concept learning on the `toy` base, every method: train on 16 images of a colour the base never
learnt (cyan) bound to a trigger word, publish, serve over HTTP, generate, score with the
validated scorer.

Adapter methods take the trigger prompts from ~0% cyan to >= 60%. Language drift is checked on
all 20 base pairings, as class accuracy and as the shift of each prompt's mean foreground hue:
with the recipes (keys and values of the cross-attention, `regularization.target=base`) LoRA,
DreamBooth-LoRA and QLoRA keep the base's accuracy and move no prompt's hue by more than 5 degrees
(`lorafleet bench concepts`, 8 seeds); textual inversion cannot drift. The bounds here (4 seeds,
to keep CI short) guard those figures with a margin of a few images. The full fine-tune is the reference: served as its own
base, held to "learns something".
"""

from __future__ import annotations

from dataclasses import asdict

import pytest

from lorafleet.toyworld.concepts import METHODS, learn_concept

pytestmark = pytest.mark.slow
ADAPTER_METHODS = [m for m in METHODS if m != "full"]


RETAINED_AT_LEAST = {"lora": 0.85, "dreambooth": 0.85, "qlora": 0.85, "textual_inversion": 0.95}
HUE_DRIFT_AT_MOST = {"lora": 7.0, "dreambooth": 7.0, "qlora": 7.0, "textual_inversion": 0.5}  # degrees, worst prompt


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_adapter_method_learns_a_held_out_colour(method, tmp_path):
    result = learn_concept(method, tmp_path, concept="colour", seeds=4)
    print("concept:", {k: v for k, v in asdict(result).items() if k not in ("per_prompt", "samples")})
    assert {prompt: len(images) for prompt, images in result.samples.items()} == {p: 4 for p in result.per_prompt}
    assert result.target_without <= 0.2, result
    assert result.target_with >= 0.6, result
    assert result.retained >= RETAINED_AT_LEAST[method], result
    assert len(result.hue_drift) == 20 and result.hue_drift_max <= HUE_DRIFT_AT_MOST[method], result.hue_drift


def test_full_fine_tune_reference(tmp_path):
    result = learn_concept("full", tmp_path, concept="colour", seeds=4)
    print("concept:", {k: v for k, v in asdict(result).items() if k not in ("per_prompt", "samples")})
    assert result.target_without <= 0.2 and result.target_with >= result.target_without + 0.15, result
