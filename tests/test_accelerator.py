"""Device and dtype choices (one place), on CPU, and the same logic on CUDA where it exists."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorafleet.accelerator import resolve_placement, seeded_generators


def test_cpu_defaults_to_float32_and_refuses_float16():
    placement = resolve_placement("cpu")
    assert placement.device.type == "cpu" and placement.dtype == torch.float32
    assert resolve_placement("cpu", "bfloat16").dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="float16 on CPU"):
        resolve_placement("cpu", "float16")


def test_auto_picks_what_exists():
    placement = resolve_placement("auto")
    assert placement.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_asking_for_cuda_without_one_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no CUDA device"):
        resolve_placement("cuda")


def test_generators_live_on_the_cpu_so_seeds_mean_the_same_everywhere():
    first, second = seeded_generators([5, 5])
    assert first.device.type == "cpu"
    assert torch.equal(torch.randn(4, generator=first), torch.randn(4, generator=second))


@pytest.mark.gpu
def test_replica_on_cuda_in_half_precision_matches_fp32(tmp_path):
    from lorafleet.serve.replica import load_replica_base
    from lorafleet.serve.settings import ServeSettings

    fp16, placement = load_replica_base(ServeSettings(device="cuda", dtype="float16"))
    assert placement.dtype == torch.float16 and fp16.pipeline.unet.device.type == "cuda"
    fp32, _ = load_replica_base(ServeSettings(device="cpu"))

    def image(pipe):
        return pipe("a red circle", num_inference_steps=4, generator=seeded_generators([0]), output_type="np").images

    assert np.abs(image(fp16.pipeline) - image(fp32.pipeline)).max() < 0.05
