"""What crosses from a replica to the gateway about where adapters live and how a pass ran:
typed, so that no module reads another's dict by string keys."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Tier(StrEnum):
    """Where an adapter was found, fastest first (a fetch from a tier missed every faster one)."""

    active = "active"  # prepared in the pipeline (routed, injected or fused)
    host = "host"  # parsed state dict in host memory
    disk = "disk"  # file by digest on local disk
    registry = "registry"


TIERS_FASTEST_FIRST = tuple(Tier)


class PassMode(StrEnum):
    """How a pipeline pass applied adapters (serve/engine.py)."""

    base = "base"  # no adapter
    active = "active"  # injected peft adapters, set_adapters
    fused = "fused"  # one set fused into the base weights
    mixed = "mixed"  # per-row routing of several sets
    slot = "slot"  # the compile-safe hot-swap slot


class FuseEvent(StrEnum):
    """A change of the fused state, reported with the pass that made it."""

    fuse = "fuse"
    unfuse = "unfuse"


@dataclass(frozen=True)
class TierResidency:
    """One tier of one replica: what it holds, and its cumulative counters."""

    digests: tuple[str, ...]
    bytes: int
    evictions: int = 0  # cumulative for host and disk; the active tier's are reported per pass
    write_failures: int = 0  # disk: files it could not write
    integrity_failures: int = 0  # disk: files that failed their digest on read (and were dropped)


Residency = dict[Tier, TierResidency]
