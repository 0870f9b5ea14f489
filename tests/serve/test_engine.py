"""The replica's pipeline engine against plain diffusers: same images whatever happened before."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from serve_setup import GUIDANCE, PROMPT, STEPS, adapter_uses, plain_diffusers_image, run_one

from lorafleet.accelerator import resolve_placement
from lorafleet.bases import load_base
from lorafleet.registry.errors import AdapterIncompatible
from lorafleet.serve.engine import PipelineEngine
from lorafleet.serve.jobs import GenerationJob

JOB = GenerationJob(PROMPT, None, STEPS, GUIDANCE, 32, 32, (0,))
TOLERANCE = 1e-4  # max abs pixel difference to plain diffusers, fused or not


def _use(fetcher, registry, ref, weight=1.0):
    return adapter_uses(fetcher, registry, [ref], [weight])[0]


def test_images_match_plain_diffusers_across_swaps_fuses_and_evictions(adapter_registry, pulled_files, fetcher):
    engine = PipelineEngine(load_base("tiny").pipeline, resolve_placement("cpu"), max_active=2, fuse_after=2)
    references = {name: plain_diffusers_image(path) for name, path in pulled_files.items() if name != "sks-token"}
    references[None] = plain_diffusers_image(None)
    sequence = ["style0", "style0", "style0", "style1", None, "style0", "style2", "style3", "style0", "style0",
                None, "style4", "style1", "style1", "style1", "style2"]
    events = []
    for name in sequence:
        uses = [_use(fetcher, adapter_registry, name)] if name else []
        result = run_one(engine, uses, JOB)
        events += result.fuse_events
        assert np.abs(result.images[0] - references[name]).max() <= TOLERANCE, (name, result.fused)
    assert "fuse" in events and "unfuse" in events  # the sequence did exercise fusing
    assert len(engine.tier.residency().digests) == 2  # and eviction


def test_leaving_the_fused_state_restores_the_base_bit_identically(adapter_registry, fetcher):
    pristine = {k: v.clone() for k, v in load_base("tiny").pipeline.unet.state_dict().items()}
    engine = PipelineEngine(load_base("tiny").pipeline, resolve_placement("cpu"), max_active=4, fuse_after=1)
    for _ in range(3):
        for name in ("style1", "style2"):
            assert run_one(engine, [_use(fetcher, adapter_registry, name)], JOB).fused
    assert run_one(engine, [], JOB).fuse_events == ["unfuse"]  # a pass with no adapter leaves the fused state
    weights = {k.replace(".base_layer", ""): v for k, v in engine.pipe.unet.state_dict().items() if "lora_" not in k}
    assert set(weights) == set(pristine)
    for key, tensor in weights.items():
        assert torch.equal(tensor, pristine[key]), key


def test_cached_tensors_are_never_mutated_by_swaps(adapter_registry, fetcher):
    engine = PipelineEngine(load_base("tiny").pipeline, resolve_placement("cpu"), max_active=1, fuse_after=1)
    use = _use(fetcher, adapter_registry, "style1")
    before = {k: v.clone() for k, v in use.adapter.payload.tensors.items()}
    for name in ("style1", "style2", "style1", "style3", "style1"):
        run_one(engine, [_use(fetcher, adapter_registry, name)], JOB)
    with torch.no_grad():
        for parameter in engine.pipe.unet.parameters():
            parameter.add_(1.0)  # anything sharing storage with the cache would change too
    for key, tensor in use.adapter.payload.tensors.items():
        assert torch.equal(tensor, before[key]), key


def test_weighted_sets_of_two_adapters_match_diffusers_set_adapters(adapter_registry, pulled_files, fetcher):
    engine = PipelineEngine(load_base("tiny").pipeline, resolve_placement("cpu"), max_active=4)
    result = run_one(engine, [_use(fetcher, adapter_registry, "style1", 0.7),
                         _use(fetcher, adapter_registry, "style2", 0.4)], JOB)
    pipe = load_base("tiny").pipeline
    pipe.load_lora_weights(str(pulled_files["style1"]), adapter_name="a")
    pipe.load_lora_weights(str(pulled_files["style2"]), adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 0.4])
    expected = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    generator=[torch.Generator().manual_seed(0)], output_type="np").images[0]
    assert np.abs(result.images[0] - expected).max() <= TOLERANCE


def test_textual_inversion_tokens_match_plain_diffusers(adapter_registry, pulled_files, fetcher):
    engine = PipelineEngine(load_base("tiny").pipeline, resolve_placement("cpu"), max_active=4)
    job = GenerationJob("a photo of <sks>", None, STEPS, GUIDANCE, 32, 32, (0,))
    result = run_one(engine, [_use(fetcher, adapter_registry, "sks-token")], job)
    expected = plain_diffusers_image(None, prompt="a photo of <sks>", textual_inversion=pulled_files["sks-token"])
    assert np.abs(result.images[0] - expected).max() <= TOLERANCE
    run_one(engine, [_use(fetcher, adapter_registry, "style1")], JOB)  # other adapters still fine afterwards


def test_full_fine_tunes_are_refused_by_the_engine(adapter_registry, fetcher, tiny_spec, tmp_path):
    from safetensors.torch import save_file

    from lorafleet.registry import PublishRequest

    unet = load_base("tiny").pipeline.unet
    save_file({f"unet.{k}": v for k, v in unet.state_dict().items()}, str(tmp_path / "full.safetensors"))
    adapter_registry.publish(tmp_path / "full.safetensors", PublishRequest(name="full", base=tiny_spec, method="full"))
    engine = PipelineEngine(load_base("tiny").pipeline, resolve_placement("cpu"))
    with pytest.raises(AdapterIncompatible):
        run_one(engine, [_use(fetcher, adapter_registry, "full")], JOB)


def test_a_textual_inversion_token_is_inactive_unless_requested(adapter_registry, fetcher):
    """After serving <sks>, a request without it must read '<sks>' as plain text again."""
    engine = PipelineEngine(load_base("tiny").pipeline, resolve_placement("cpu"), max_active=4)
    job = GenerationJob("a photo of <sks>", None, STEPS, GUIDANCE, 32, 32, (0,))
    before = run_one(engine, [], job).images[0]
    with_token = run_one(engine, [_use(fetcher, adapter_registry, "sks-token")], job).images[0]
    after = run_one(engine, [], job).images[0]
    assert np.abs(with_token - before).max() > 1e-3
    assert np.abs(after - before).max() == 0


def test_active_tier_respects_its_byte_budget(adapter_registry, fetcher):
    one = _use(fetcher, adapter_registry, "style1").adapter.nbytes
    budget = 2 * one + one // 2
    engine = PipelineEngine(load_base("tiny").pipeline, resolve_placement("cpu"), max_active=10,
                            max_active_bytes=budget, fuse_after=1)  # every set is injected to be fused
    evicted = []
    for name in ("style1", "style2", "style3", "style4"):
        result = run_one(engine, [_use(fetcher, adapter_registry, name)], JOB)
        assert result.mode == "fused"
        evicted += result.evicted
    assert len(engine.tier.residency().digests) == 2 and engine.tier.residency().bytes <= budget
    assert len(evicted) == 2


def test_routed_copies_respect_the_same_byte_budget(adapter_registry, fetcher):
    one = _use(fetcher, adapter_registry, "style1").adapter.nbytes
    engine = PipelineEngine(load_base("tiny").pipeline, resolve_placement("cpu"), max_active_bytes=2 * one + one // 2)
    for name in ("style1", "style2", "style3", "style4"):
        assert run_one(engine, [_use(fetcher, adapter_registry, name)], JOB).mode == "mixed"
    latest = [adapter_registry.resolve(name).digest for name in ("style3", "style4")]
    assert engine.routed.cache.keys() == latest and not engine.tier.residency().digests  # least recently used went first


@pytest.mark.parametrize("base", ["tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux"])
def test_a_pass_never_asks_the_pipeline_for_its_device(base, monkeypatch):
    """``pipe._execution_device`` walks every module of every component (1.2 ms on `tiny`, 1.7 ms
    on `small`, per call); the engine knows its placement, and the denoising loop has its
    conditioning's device, so a pass needs no such walk."""
    loaded = load_base(base)
    engine = PipelineEngine(loaded.pipeline, resolve_placement("cpu"))
    asked = []
    pipeline_class = type(loaded.pipeline)
    walk = pipeline_class._execution_device
    monkeypatch.setattr(pipeline_class, "_execution_device", property(lambda pipe: asked.append(1) or walk.fget(pipe)))
    size = loaded.native_size
    job = GenerationJob(PROMPT, None, 2, GUIDANCE, size, size, (0, 1))
    assert run_one(engine, [], job).images.shape[0] == 2
    assert asked == []
