"""The one storage interface every registry backend implements.

Keys are '/'-separated relative paths built by the registry from validated names only.
Three kinds of write, each with its own guarantee:

- ``put_blob``: idempotent write of content-addressed bytes (same key, same bytes);
- ``create``: create-once; exactly one of several concurrent creators succeeds;
- ``compare_and_swap``: replace an object only if it still has the token we read.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lorafleet.errors import ErrorKind, LorafleetError

_KEY_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._/-]*$")


class ObjectExists(LorafleetError):
    """``create`` lost: the key already exists."""

    code = "object_exists"
    kind = ErrorKind.conflict


class PreconditionFailed(LorafleetError):
    """``compare_and_swap`` lost: the object changed since it was read."""

    code = "precondition_failed"
    kind = ErrorKind.conflict


@dataclass(frozen=True)
class StoredObject:
    data: bytes
    token: str  # opaque; pass back to compare_and_swap


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: float  # unix seconds


def check_key(key: str) -> str:
    """Refuse any key that could leave the store's root (defence in depth behind name checks)."""
    parts = key.split("/")
    if not _KEY_PATTERN.fullmatch(key) or any(p in {"", ".", ".."} for p in parts):
        raise ValueError(f"unsafe storage key {key!r}")
    return key


class ObjectStore(ABC):
    """A flat key → bytes store with create-once and compare-and-swap."""

    uri: str

    @abstractmethod
    def read(self, key: str) -> StoredObject | None:
        """The object and its CAS token, or None when absent."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> None:
        """Write ``data`` only if ``key`` does not exist; else raise ObjectExists."""

    @abstractmethod
    def compare_and_swap(self, key: str, data: bytes, expected_token: str | None) -> None:
        """Replace ``key`` if its token is ``expected_token`` (None: must be absent)."""

    @abstractmethod
    def put_blob(self, key: str, source: Path) -> None:
        """Store the file at ``source`` under ``key``; when present, only refresh its timestamp."""

    @abstractmethod
    def open_blob(self, key: str) -> BinaryIO | None:
        """A readable binary stream of the object, or None when absent."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def info(self, key: str) -> ObjectInfo | None:
        """Size and modification time of ``key``, or None when absent."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; absent keys are ignored."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (a folder ending in '/')."""

    @abstractmethod
    def check(self) -> None:
        """Raise RegistryUnavailable / RegistryConfigError when the store cannot be used."""
