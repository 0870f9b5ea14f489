"""The compile-safe slot: swaps by copying, same images as peft's own layers, no module changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch._dynamo
from serve_setup import GUIDANCE, PROMPT, STEPS, adapter_uses, diffusers_set_image, run_one

from lorafleet.accelerator import resolve_placement
from lorafleet.bases import load_base
from lorafleet.registry.errors import AdapterIncompatible
from lorafleet.serve.engine import PipelineEngine
from lorafleet.serve.jobs import GenerationJob
from lorafleet.serve.slots import SLOT, LoraSlot

TOLERANCE = 1e-4
JOB = GenerationJob(PROMPT, None, STEPS, GUIDANCE, 32, 32, (0,))
SEQUENCE = [["style0"], ["style1"], [], ["style1", "style2"], ["style3"], ["style1"], []]


_uses = adapter_uses


def _slot_engine(target_rank=8, compile_denoiser=False, device="cpu", dtype="float32"):
    placement = resolve_placement(device, dtype)
    pipe = load_base("tiny").pipeline.to(placement.device, placement.dtype)
    return PipelineEngine(pipe, placement, slot=LoraSlot(pipe, target_rank, compile_denoiser))


def _reference(pulled_files, names) -> np.ndarray:
    """Plain diffusers with the same set and weights."""
    weight = 1.0 if len(names) == 1 else 0.6
    return diffusers_set_image({pulled_files[name]: weight for name in names})


def test_swaps_give_the_images_of_plain_diffusers_and_never_change_modules(adapter_registry, pulled_files, fetcher):
    engine = _slot_engine()
    pristine = {k: v.clone() for k, v in engine.pipe.unet.state_dict().items() if "lora_" not in k}
    modules_before = [name for name, _ in engine.pipe.unet.named_modules()]
    for names in SEQUENCE:
        result = run_one(engine, _uses(fetcher, adapter_registry, names), JOB)
        assert result.mode == "slot"
        difference = np.abs(result.images - _reference(pulled_files, names)).max()
        assert difference <= TOLERANCE, (names, difference)
    assert [name for name, _ in engine.pipe.unet.named_modules()] == modules_before
    assert engine.slot.adapter_names() == {SLOT} and engine.slot.swaps == len(SEQUENCE)
    for key, tensor in engine.pipe.unet.state_dict().items():
        if "lora_" not in key:
            assert torch.equal(tensor, pristine[key]), key  # base weights untouched throughout


def test_a_set_already_in_the_slot_is_not_copied_again(adapter_registry, fetcher):
    engine = _slot_engine()
    for _ in range(3):
        run_one(engine, _uses(fetcher, adapter_registry, ["style1"]), JOB)
    assert engine.slot.swaps == 1


def test_a_set_over_the_target_rank_is_refused_and_the_slot_keeps_serving(adapter_registry, fetcher):
    engine = _slot_engine(target_rank=4)  # each test adapter has rank 4: two of them do not fit
    before = run_one(engine, _uses(fetcher, adapter_registry, ["style1"]), JOB).images
    with pytest.raises(AdapterIncompatible, match="target_rank"):
        run_one(engine, _uses(fetcher, adapter_registry, ["style1", "style2"]), JOB)
    after = run_one(engine, _uses(fetcher, adapter_registry, ["style1"]), JOB).images
    assert np.abs(after - before).max() == 0


def test_slot_mode_batches_only_requests_of_the_same_set(adapter_registry, fetcher):
    engine = _slot_engine()
    one, two = _uses(fetcher, adapter_registry, ["style1"]), _uses(fetcher, adapter_registry, ["style2"])
    assert engine.batch_key(one, JOB) != engine.batch_key(two, JOB)
    assert engine.batch_key(one, JOB) == engine.batch_key(_uses(fetcher, adapter_registry, ["style1"]), JOB)


@pytest.mark.gpu
def test_compiled_unet_swaps_without_recompiling(adapter_registry, fetcher):
    """On CUDA: compile once, then every swap reuses the compiled graph."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    engine = _slot_engine(target_rank=8, compile_denoiser=True, device="cuda", dtype="float16")
    run_one(engine, _uses(fetcher, adapter_registry, ["style0"]), JOB)  # compiles
    torch._dynamo.config.error_on_recompile = True
    try:
        for names in SEQUENCE[1:]:
            run_one(engine, _uses(fetcher, adapter_registry, names), JOB)
    finally:
        torch._dynamo.config.error_on_recompile = False
