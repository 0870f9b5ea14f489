"""Concept learning on the `toy` base, every method: train on 16 images of a colour the base never
learnt (cyan) bound to a trigger word, publish, serve over HTTP, generate, score with the
validated scorer. Without the adapter the prompts are near 0% cyan; with it >= 60%; the base's
own prompts keep >= 90% of their accuracy (language drift)."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from lorafleet.toyworld.concepts import METHODS, learn_concept

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method", list(METHODS))
def test_method_learns_a_held_out_colour(method, tmp_path):
    result = learn_concept(method, tmp_path, concept="colour", seeds=8)
    print("concept:", {k: v for k, v in asdict(result).items() if k != "per_prompt"})
    assert result.target_without <= 0.2, result
    assert result.target_with >= 0.6, result
    if method != "full":  # the full fine-tune is the reference, not held to the drift bound
        assert result.retained >= 0.9, result
