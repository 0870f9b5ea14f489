"""What names an adapter: its name, its version, its digest, and references to them.

A reference is one of::

    NAME              the alias ``latest`` (highest version that is not yanked)
    NAME@7            an exact version
    NAME:prod         an alias
    NAME@sha256:HEX   an exact digest

An ``AdapterId`` (name, version, digest) is what a reference resolves to; the digest is the key
that caches, logs and equality use, so two different byte strings never share a key.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import BinaryIO

from .errors import InvalidName, InvalidReference, ReservedAlias

NAME_REGEX = r"[a-z0-9][a-z0-9._-]{0,63}"
ALIAS_REGEX = r"[a-z][a-z0-9._-]{0,31}"
DIGEST_REGEX = r"sha256:[0-9a-f]{64}"
VERSION_REGEX = r"[1-9][0-9]{0,8}"
# The whole reference grammar in one expression (also published in the HTTP API's schema).
REF_REGEX = rf"^{NAME_REGEX}(?:@(?:{VERSION_REGEX}|{DIGEST_REGEX})|:{ALIAS_REGEX})?$"
NAME_PATTERN = re.compile(rf"^{NAME_REGEX}$")
ALIAS_PATTERN = re.compile(rf"^{ALIAS_REGEX}$")
DIGEST_PATTERN = re.compile(rf"^{DIGEST_REGEX}$")
VERSION_PATTERN = re.compile(rf"^{VERSION_REGEX}$")
LATEST = "latest"
RESERVED_ALIASES = frozenset({LATEST})


def validate_name(name: object, field: str = "name") -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidName(
            f"invalid adapter name {name!r}: use 1-64 characters of a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit",
            field=field,
        )
    return name


def validate_alias(alias: object, field: str = "alias", *, allow_reserved: bool = False) -> str:
    if not isinstance(alias, str) or not ALIAS_PATTERN.fullmatch(alias):
        raise InvalidName(
            f"invalid alias {alias!r}: use 1-32 characters of a-z, 0-9, '.', '_', '-', starting "
            "with a letter",
            field=field,
        )
    if alias in RESERVED_ALIASES and not allow_reserved:
        raise ReservedAlias(f"alias {alias!r} is reserved and follows the newest version", field=field)
    return alias


def validate_version(version: object, field: str = "version") -> int:
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version < 10**9:
        raise InvalidReference(f"invalid version {version!r}: a positive integer", field=field)
    return version


def validate_digest(digest: object, field: str = "digest") -> str:
    if not isinstance(digest, str) or not DIGEST_PATTERN.fullmatch(digest):
        raise InvalidReference(f"invalid digest {digest!r}: expected sha256:<64 hex>", field=field)
    return digest


def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha256_stream(stream: BinaryIO, chunk_size: int = 1 << 20) -> tuple[str, int]:
    """Digest and length of everything left in ``stream``."""
    hasher = hashlib.sha256()
    size = 0
    while chunk := stream.read(chunk_size):
        hasher.update(chunk)
        size += len(chunk)
    return "sha256:" + hasher.hexdigest(), size


@dataclass(frozen=True)
class AdapterRef:
    """A parsed reference; exactly one of version, alias, digest is set."""

    name: str
    version: int | None = None
    alias: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: object, field: str = "ref") -> "AdapterRef":
        if not isinstance(text, str) or not text or len(text) > 200:
            raise InvalidReference(f"invalid adapter reference {text!r}", field=field)
        if "@" in text:
            return cls._parse_at(text, field)
        if ":" in text:
            name, alias = text.split(":", 1)
            validate_name(name, field)
            validate_alias(alias, field, allow_reserved=True)
            return cls(name=name, alias=alias)
        return cls(name=validate_name(text, field), alias=LATEST)

    @classmethod
    def _parse_at(cls, text: str, field: str) -> "AdapterRef":
        name, target = text.split("@", 1)
        validate_name(name, field)
        if target.startswith("sha256:"):
            return cls(name=name, digest=validate_digest(target, field))
        if not VERSION_PATTERN.fullmatch(target):
            raise InvalidReference(
                f"invalid adapter reference {text!r}: expected NAME@VERSION or NAME@sha256:HEX",
                field=field,
            )
        return cls(name=name, version=validate_version(int(target), field))

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@{self.version}"
        if self.digest is not None:
            return f"{self.name}@{self.digest}"
        return self.name if self.alias == LATEST else f"{self.name}:{self.alias}"


@dataclass(frozen=True)
class AdapterId:
    """A resolved adapter version."""

    name: str
    version: int
    digest: str

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"
