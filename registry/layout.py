"""Where the registry keeps things in its store, and the small records it stores besides manifests.

Layout (every name validated before it becomes a key)::

    blobs/sha256/ab/abcdef...           content-addressed safetensors, written idempotently
    manifests/NAME/v000000007.json      created once; the version number is won by create-once
    yanks/NAME/v000000007.json          created once; a yanked version stays resolvable by number
    aliases/NAME/ALIAS.json             moved by compare-and-swap, with its history
    index/sha256/ab/abcdef.../NAME/v000000007   digest -> versions using it (NAME@sha256:... refs, gc)
"""

from __future__ import annotations

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


class AliasRecord(BaseModel):
    name: str
    alias: str
    version: int
    revision: int = Field(description="Incremented on every move (compare-and-swap token).")
    updated_at: datetime
    history: list[AliasMove] = Field(default_factory=list)


class YankRecord(BaseModel):
    reason: str = ""
    at: datetime
