"""Where the registry keeps things in its store, and the small records it stores besides manifests.

Layout (every name validated before it becomes a key)::

    blobs/sha256/ab/abcdef...           content-addressed safetensors, written idempotently
    manifests/NAME/v000000007.json      created once; the version number is won by create-once
    yanks/NAME/v000000007.json          created once; a yanked version stays resolvable by number
    aliases/NAME/ALIAS.json             moved by compare-and-swap, with its history
    pins/NAME.json                      the version serving replicas keep resident (one per name)
    index/sha256/ab/abcdef.../NAME/v000000007   digest -> versions using it (NAME@sha256:... refs, gc)
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime

from pydantic import BaseModel, Field

from .identity import NAME_PATTERN, validate_digest


def blob_key(digest: str) -> str:
    hexdigest = validate_digest(digest).split(":", 1)[1]
    return f"blobs/sha256/{hexdigest[:2]}/{hexdigest}"


def manifest_key(name: str, version: int) -> str:
    return f"manifests/{name}/v{version:09d}.json"


def yank_key(name: str, version: int) -> str:
    return f"yanks/{name}/v{version:09d}.json"


def alias_key(name: str, alias: str) -> str:
    return f"aliases/{name}/{alias}.json"


def pin_key(name: str) -> str:
    return f"pins/{name}.json"


def digest_index_prefix(digest: str) -> str:
    hexdigest = validate_digest(digest).split(":", 1)[1]
    return f"index/sha256/{hexdigest[:2]}/{hexdigest}/"


def digest_index_key(digest: str, name: str, version: int) -> str:
    return f"{digest_index_prefix(digest)}{name}/v{version:09d}"


def digest_index_entry(key: str) -> tuple[str, int] | None:
    """(name, version) of a ``digest_index_key``, or None for a key it did not write."""
    *_, name, stem = ["", *key.split("/")]
    if not (stem.startswith("v") and stem[1:].isdigit() and NAME_PATTERN.fullmatch(name)):
        return None
    return name, int(stem[1:])


def version_from_key(key: str) -> int | None:
    stem = key.rsplit("/", 1)[-1]
    if stem.startswith("v") and stem.endswith(".json") and stem[1:-5].isdigit():
        return int(stem[1:-5])
    return None


class AliasMove(BaseModel):
    version: int
    at: datetime
    split: dict[int, float] | None = None
    evidence: str | None = None  # e.g. the digest of the eval report a gated promotion stored


def pick_version(split: dict[int, float], key: str | None, salt: str) -> int:
    """The version of a weighted split that ``key`` falls on: sticky (the same key, the same
    version, as long as the weights stay), uniform over keys; no key draws at random."""
    if key is None:
        point = secrets.randbelow(2**53) / 2**53
    else:
        point = int.from_bytes(hashlib.sha256(f"{salt}\0{key}".encode()).digest()[:8], "big") / 2**64
    total = 0.0
    for version, weight in sorted(split.items()):
        total += weight
        if point < total:
            return version
    return max(split)  # rounding at the top end


class PinRecord(BaseModel):
    """A version that every serving replica keeps resident (host memory) across evictions."""

    name: str
    version: int
    digest: str
    size: int
    pinned_at: datetime


class AliasRecord(BaseModel):
    name: str
    alias: str
    version: int = Field(description="The version served (with a split: the heaviest).")
    revision: int = Field(description="Incremented on every move (compare-and-swap token).")
    updated_at: datetime
    history: list[AliasMove] = Field(default_factory=list)
    split: dict[int, float] | None = Field(None, description="A canary split: version -> share of callers (sum 1).")

    def version_for(self, key: str | None) -> int:
        """The version this caller key is served."""
        return pick_version(self.split, key, f"{self.name}:{self.alias}") if self.split else self.version


class YankRecord(BaseModel):
    reason: str = ""
    at: datetime
