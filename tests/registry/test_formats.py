"""Accepted layouts: what is published loads in plain diffusers and means the same thing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import write_embedding
from safetensors.torch import load_file, save_file

from lorafleet.bases import load_base
from lorafleet.registry import AdapterFormat, PublishRequest
from lorafleet.registry.errors import AdapterIncompatible
from lorafleet.registry.formats import payload_from_stored
from lorafleet.registry.kohya import to_kohya

PROMPT = "a red circle on the left"


def _generate(pipe, prompt: str = PROMPT, seed: int = 0) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=4, guidance_scale=4.0, generator=generator, output_type="np").images[0]


def _image_with(path) -> np.ndarray:
    pipe = load_base("tiny").pipeline
    pipe.load_lora_weights(str(path))
    return _generate(pipe)


def test_diffusers_lora_round_trips_through_the_registry(registry, tiny_spec, diffusers_lora_dir, tmp_path):
    manifest = registry.publish(diffusers_lora_dir, PublishRequest(name="style", base=tiny_spec))
    assert manifest.rank == 4 and manifest.alpha == 8.0
    assert set(manifest.components) == {"unet", "text_encoder"}
    _, pulled = registry.pull("style", tmp_path / "pulled")
    original = _image_with(diffusers_lora_dir / "pytorch_lora_weights.safetensors")
    served = _image_with(pulled)
    base = _generate(load_base("tiny").pipeline)
    assert np.abs(original - served).max() <= 1e-6
    assert np.abs(original - base).max() > 1e-3  # the adapter does change the image


def test_alpha_is_kept_not_silently_reset(registry, tiny_spec, diffusers_lora_dir, tmp_path):
    """Loading the same weights without alpha (scale 1 instead of 2) gives another image."""
    registry.publish(diffusers_lora_dir, PublishRequest(name="style", base=tiny_spec))
    _, pulled = registry.pull("style", tmp_path / "pulled")
    no_metadata = tmp_path / "no-metadata.safetensors"
    save_file(load_file(str(pulled)), str(no_metadata))
    assert np.abs(_image_with(pulled) - _image_with(no_metadata)).max() > 1e-3


def test_kohya_export_and_publish_mean_the_same_adapter(registry, tiny_spec, diffusers_lora_dir, tmp_path):
    manifest = registry.publish(diffusers_lora_dir, PublishRequest(name="style", base=tiny_spec))
    tensors, metadata = to_kohya(payload_from_stored(registry.read_blob(manifest)), tiny_spec)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)
    assert {float(v) for k, v in tensors.items() if k.endswith(".alpha")} == {8.0}
    kohya_file = tmp_path / "kohya.safetensors"
    save_file(tensors, str(kohya_file), metadata=metadata)
    converted = registry.publish(kohya_file, PublishRequest(name="from-kohya", base=tiny_spec))
    assert converted.source_format == "kohya" and converted.alpha == 8.0
    _, pulled = registry.pull("from-kohya", tmp_path / "pulled")
    original = _image_with(diffusers_lora_dir / "pytorch_lora_weights.safetensors")
    assert np.abs(_image_with(pulled) - original).max() <= 1e-6


def test_kohya_per_module_alphas_become_patterns(registry, tiny_spec, tmp_path):
    module = "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    other = "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    tensors = {
        f"lora_unet_{module}.lora_down.weight": torch.randn(4, 32), f"lora_unet_{module}.lora_up.weight": torch.randn(32, 4),
        f"lora_unet_{module}.alpha": torch.tensor(2.0),
        f"lora_unet_{other}.lora_down.weight": torch.randn(8, 32), f"lora_unet_{other}.lora_up.weight": torch.randn(32, 8),
        f"lora_unet_{other}.alpha": torch.tensor(2.0),
    }
    tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v.lora_down.weight"] = torch.randn(4, 32)
    tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v.lora_up.weight"] = torch.randn(32, 4)
    tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v.alpha"] = torch.tensor(1.0)
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path))
    manifest = registry.publish(path, PublishRequest(name="mixed", base=tiny_spec))
    unet = manifest.components["unet"]
    assert unet.rank == 4
    assert unet.rank_pattern == {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k": 8}
    assert unet.alpha == 2.0
    assert unet.alpha_pattern == {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v": 1.0}


@pytest.mark.parametrize("base", ["tiny", "tiny-sdxl"])
def test_peft_folder_with_adapter_config_is_accepted(registry, base, tmp_path):
    from peft import LoraConfig, get_peft_model

    from lorafleet.bases import base_spec

    tiny_spec = base_spec(base)
    unet = load_base(base).pipeline.unet
    model = get_peft_model(unet, LoraConfig(r=2, lora_alpha=6, target_modules=["to_q", "to_v"]))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_()
    model.save_pretrained(str(tmp_path / "peft"))
    manifest = registry.publish(tmp_path / "peft", PublishRequest(name="peft-style", base=tiny_spec))
    assert manifest.source_format == "peft" and manifest.rank == 2 and manifest.alpha == 6.0
    assert set(manifest.components) == {"unet"}


def test_textual_inversion_publishes_and_loads_in_diffusers(registry, tiny_spec, tmp_path):
    manifest = registry.publish(write_embedding(tmp_path, tiny_spec, "<sks>"),
                                PublishRequest(name="sks-token", base=tiny_spec))
    assert manifest.format == AdapterFormat.textual_inversion and manifest.trigger_tokens == ["<sks>"]
    _, pulled = registry.pull("sks-token", tmp_path / "pulled")
    pipe = load_base("tiny").pipeline
    pipe.load_textual_inversion(str(pulled))
    assert "<sks>" in pipe.tokenizer.get_vocab()
    with_token = _generate(pipe, "a photo of <sks>")
    assert with_token.shape == (32, 32, 3)


def test_textual_inversion_refuses_existing_token_and_wrong_width(registry, tiny_spec, tmp_path):
    existing = tmp_path / "red.safetensors"
    save_file({"red": torch.randn(1, tiny_spec.text_hidden_size)}, str(existing))
    with pytest.raises(AdapterIncompatible, match="already a token"):
        registry.publish(existing, PublishRequest(name="red-token", base=tiny_spec))
    wide = tmp_path / "wide.safetensors"
    save_file({"<wide>": torch.randn(1, tiny_spec.text_hidden_size + 1)}, str(wide))
    with pytest.raises(AdapterIncompatible, match="embedding shape"):
        registry.publish(wide, PublishRequest(name="wide-token", base=tiny_spec))


def test_full_unet_weights_are_validated_against_the_base(registry, tiny_spec, tmp_path):
    unet = load_base("tiny").pipeline.unet
    state = {f"unet.{k}": v.clone() for k, v in unet.state_dict().items()}
    path = tmp_path / "full.safetensors"
    save_file(state, str(path))
    manifest = registry.publish(path, PublishRequest(name="full-ft", base=tiny_spec, method="full"))
    assert manifest.format == AdapterFormat.full_unet
    state.pop(next(iter(state)))
    save_file(state, str(path))
    with pytest.raises(AdapterIncompatible, match="full UNet"):
        registry.publish(path, PublishRequest(name="full-ft", base=tiny_spec, method="full"))


def test_stored_metadata_is_diffusers_lora_metadata(registry, tiny_spec, diffusers_lora_dir):
    manifest = registry.publish(diffusers_lora_dir, PublishRequest(name="style", base=tiny_spec))
    data = registry.read_blob(manifest)
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    flat = json.loads(header["__metadata__"]["lora_adapter_metadata"])
    assert flat["unet.r"] == 4 and flat["unet.lora_alpha"] == 8.0
    assert flat["text_encoder.r"] == 4


@pytest.mark.parametrize("pattern", [{"to_v": 4}, {"attn1.to_v": 4}, {"^.*attn2\\.to_v$": 4}])
def test_a_peft_folder_with_a_pattern_keyed_rank_is_accepted_and_means_what_peft_loads(registry, tiny_spec, pattern,
                                                                                       tmp_path):
    """peft matches rank_pattern keys as module-name suffixes or regexes, not only exact paths."""
    from peft import LoraConfig, get_peft_model

    unet = load_base("tiny").pipeline.unet
    model = get_peft_model(unet, LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], rank_pattern=pattern))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_()
    model.save_pretrained(str(tmp_path / "peft"))
    manifest = registry.publish(tmp_path / "peft", PublishRequest(name="peft-ranks", base=tiny_spec))
    config = manifest.components["unet"]
    ranks = {name.split(".lora_A")[0]: p.shape[0] for name, p in model.named_parameters() if "lora_A" in name}
    assert 4 in ranks.values() and 2 in ranks.values()  # the pattern did pick some modules, not all
    for module, rank in ranks.items():
        path = module.split("base_model.model.")[-1]
        assert config.rank_of(path) == rank and config.scale_of(path) == 2 / rank
