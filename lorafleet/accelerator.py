"""Device and dtype choices, in one place, for serving and training.

CPU: float32 (half precision is slow and inexact there). CUDA: float16 by default, bfloat16
where the device supports it and it is asked for. Random generators live on the CPU, so a seed
gives the same initial noise whatever the device (diffusers' recommended practice).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

DeviceSetting = Literal["auto", "cpu", "cuda"]
DtypeSetting = Literal["auto", "float32", "float16", "bfloat16"]
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def resolve_placement(device: DeviceSetting = "auto", dtype: DtypeSetting = "auto") -> Placement:
    """Where the model runs and in which precision."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for, but no CUDA device is available")
    if dtype == "auto":
        chosen = torch.float16 if device == "cuda" else torch.float32
    else:
        chosen = _DTYPES[dtype]
    if device == "cpu" and chosen == torch.float16:
        raise RuntimeError("float16 on CPU is not supported; use float32 (or bfloat16)")
    return Placement(torch.device(device), chosen)


ROW_WEIGHTS_BYTES_CPU = 64 * 1024**2


def row_weights_budget(placement: Placement, setting: int | None = None) -> int:
    """Bytes of per-image merged weights a mixed pass may use (serve/routing.py).

    CPU: small layers run faster with per-row weights than with a LoRA update (measured, see
    serve/routing.py). CUDA: 0, since per-row weights are re-read from memory at every call."""
    if setting is not None:
        return setting
    return 0 if placement.is_cuda else ROW_WEIGHTS_BYTES_CPU


def seeded_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image, so each image depends only on its own seed."""
    return [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in seeds]


def peak_memory_bytes(placement: Placement) -> int | None:
    if placement.is_cuda:
        return int(torch.cuda.max_memory_allocated(placement.device))
    return None
