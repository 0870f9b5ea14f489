"""The built-in tiny base: deterministic, exportable as a plain diffusers directory."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from helpers import assert_same_model

from lorafleet.bases import base_spec, export_base, load_base
from lorafleet.errors import BaseModelError


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

    assert_same_model(pipe, exported.pipeline, image(pipe), image(exported.pipeline))


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


@pytest.mark.parametrize("base", ["tiny", "small", "tiny-sdxl"])
def test_single_file_checkpoint_loads_with_the_same_fingerprint(tmp_path, base):
    """An original-layout (LDM; SDXL: SGM with an OpenCLIP second encoder) checkpoint we write loads
    through diffusers' from_single_file, its family detected from its keys."""
    from lorafleet.bases.single_file import export_single_file

    exported = export_base(base, tmp_path / "configs")
    checkpoint = export_single_file(exported.pipeline, tmp_path / "model.safetensors")
    from safetensors import safe_open

    with safe_open(str(checkpoint), "pt") as handle:
        keys = list(handle.keys())
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in keys)
    loaded = load_base(str(checkpoint), base_config=str(tmp_path / "configs"))
    assert loaded.fingerprint == exported.fingerprint and loaded.family.name == exported.family.name


def test_a_base_of_an_unsupported_family_is_refused_naming_the_supported_ones(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "QwenImagePipeline"}')
    with pytest.raises(BaseModelError, match="QwenImagePipeline.*Stable Diffusion 1.x/2.x, Stable Diffusion XL, Flux, "
                                             "Stable Diffusion 3.5"):
        load_base(str(tmp_path))


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04not really")
    with pytest.raises(BaseModelError, match="only .safetensors"):
        load_base(str(tmp_path / "model.ckpt"))


def test_toy_base_is_stable_diffusion_shaped_and_draws_its_concepts():
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from lorafleet.bases import load_base
    from lorafleet.toyworld.evaluate import concept_accuracy

    pipe = load_base("toy").pipeline
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.scheduler, DDIMScheduler)
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    targets = {"a red circle": ("red", "circle"), "a blue triangle": ("blue", "triangle"),
               "a yellow square": ("yellow", "square"), "a purple circle": ("purple", "circle")}
    measured = concept_accuracy(pipe, targets, seeds=[0, 1, 2, 3])
    assert measured.colour_accuracy >= 0.8 and measured.shape_accuracy >= 0.7, measured
    held_out = concept_accuracy(pipe, {"a cyan circle": ("cyan", "circle")}, seeds=[0, 1, 2, 3])
    assert held_out.colour_accuracy <= 0.25, held_out  # cyan was held out of its training


def test_train_toy_command_runs_the_recipe_end_to_end(tmp_path):
    from lorafleet.bases import load_base

    result = subprocess.run([sys.executable, "-m", "lorafleet.cli", "base", "train-toy", "--out", str(tmp_path / "toy"),
                             "--vae-steps", "3", "--unet-steps", "3", "--no-evaluate", "--threads", "1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "toy" / "training_report.json").read_text())
    assert report["recipe"]["unet_steps"] == 3 and report["parameters"]["unet"] > 1_000_000
    assert load_base(str(tmp_path / "toy")).pipeline.unet.config.cross_attention_dim == 64


def test_toy_recipe_at_64_px_gives_the_unet_16x16_latents(tmp_path):
    from lorafleet.toyworld.base_model import ToyRecipe, train_toy_base
    from lorafleet.toyworld.evaluate import generate

    recipe = ToyRecipe(vae_steps=2, unet_steps=2, vae_batch=4, unet_batch=4, dataset_size=32, image_size=64,
                       threads=1)
    report = train_toy_base(tmp_path / "toy64", recipe, log=lambda line: None)
    assert report["recipe"]["image_size"] == 64
    loaded = load_base(str(tmp_path / "toy64"))
    assert loaded.native_size == 64 and loaded.pipeline.unet.config.sample_size == 16
    assert generate(loaded.pipeline, "a red star", seeds=[0], steps=2).shape == (1, 64, 64, 3)


def test_train_toy_refuses_another_resolution_over_the_packaged_base():
    result = subprocess.run([sys.executable, "-m", "lorafleet.cli", "base", "train-toy", "--resolution", "64"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--resolution 64 needs --out" in result.stderr
    bad = subprocess.run([sys.executable, "-m", "lorafleet.cli", "base", "train-toy", "--resolution", "48",
                          "--out", "/nonexistent/never-written"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--resolution" in bad.stderr


def test_toy_recipe_is_reproducible_from_its_seed(tmp_path):
    from safetensors.torch import load_file

    from lorafleet.toyworld.base_model import ToyRecipe, train_toy_base

    def weights(name: str, seed: int) -> dict:
        recipe = ToyRecipe(seed=seed, vae_steps=3, unet_steps=3, vae_batch=4, unet_batch=4, dataset_size=32, threads=1)
        train_toy_base(tmp_path / name, recipe, log=lambda line: None)
        return {part: load_file(tmp_path / name / part / "diffusion_pytorch_model.safetensors")
                for part in ("vae", "unet")}

    first, again, other = weights("first", 7), weights("again", 7), weights("other", 8)
    for part in ("vae", "unet"):
        assert all(torch.equal(first[part][key], again[part][key]) for key in first[part])
        assert not all(torch.equal(first[part][key], other[part][key]) for key in first[part])
