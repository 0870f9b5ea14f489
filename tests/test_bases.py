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


@pytest.mark.parametrize("base", ["tiny", "small"])
def test_single_file_checkpoint_loads_with_the_same_fingerprint(tmp_path, base):
    """An original-layout (LDM) checkpoint we write loads through diffusers' from_single_file."""
    from lorafleet.bases.single_file import export_single_file

    exported = export_base(base, tmp_path / "configs")
    checkpoint = export_single_file(exported.pipeline, tmp_path / "model.safetensors")
    from safetensors import safe_open

    with safe_open(str(checkpoint), "pt") as handle:
        keys = list(handle.keys())
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in keys)
    loaded = load_base(str(checkpoint), base_config=str(tmp_path / "configs"))
    assert loaded.fingerprint == exported.fingerprint


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04not really")
    with pytest.raises(BaseModelError, match="only .safetensors"):
        load_base(str(tmp_path / "model.ckpt"))
