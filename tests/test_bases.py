"""The built-in tiny base: deterministic, exportable as a plain diffusers directory."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from lorafleet.registry.errors import BaseModelError

from lorafleet.bases import base_spec, export_base, load_base


def test_tiny_is_deterministic_and_fingerprinted():
    first, second = load_base("tiny"), load_base("tiny")
    assert first.fingerprint == second.fingerprint and first.fingerprint.startswith("sha256:")
    for name, tensor in first.pipeline.unet.state_dict().items():
        assert torch.equal(tensor, second.pipeline.unet.state_dict()[name])


def test_tiny_builds_in_about_a_second():
    load_base("tiny")  # imports
    started = time.perf_counter()
    load_base("tiny")
    assert time.perf_counter() - started < 2.0


def test_exported_tiny_loads_in_plain_diffusers_with_the_same_fingerprint(tmp_path):
    from diffusers import StableDiffusionPipeline

    exported = export_base("tiny", tmp_path / "tiny")
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "tiny"))
    pipe.set_progress_bar_config(disable=True)
    reloaded = load_base(str(tmp_path / "tiny"))
    assert reloaded.fingerprint == exported.fingerprint
    size = sum(p.stat().st_size for p in (tmp_path / "tiny").rglob("*") if p.is_file())
    assert size < 10 * 1024 * 1024

    def image(p):
        return p("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                 output_type="np").images[0]

    assert np.array_equal(image(pipe), image(exported.pipeline))


def test_export_refuses_a_non_empty_destination(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(BaseModelError):
        export_base("tiny", tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_unknown_base_is_a_clear_error(tmp_path):
    with pytest.raises(BaseModelError, match="unknown base"):
        base_spec("no-such-base")
    with pytest.raises(BaseModelError, match="model_index.json"):
        load_base(str(tmp_path))


def test_spec_lists_targetable_modules():
    spec = base_spec("tiny")
    assert spec.module("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k").kind == "linear"
    assert spec.module("text_encoder", "encoder.layers.0.self_attn.q_proj") is not None
    assert spec.text_hidden_size == 32
