"""Registry storage backends, chosen by URI scheme from one table."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..errors import RegistryConfigError
from .base import ObjectExists, ObjectInfo, ObjectStore, PreconditionFailed, StoredObject
from .file import FileStore
from .s3 import S3Store

DEFAULT_REGISTRY = "file://~/.lorafleet/registry"


def _file_store(uri: str) -> ObjectStore:
    parsed = urlparse(uri)
    if parsed.netloc == "~":  # file://~/registry
        return FileStore(Path("~" + unquote(parsed.path)))
    if parsed.netloc not in ("", "localhost") or not parsed.path:
        raise RegistryConfigError(f"file registry URI must be file:///absolute/path, got {uri!r}")
    return FileStore(Path(unquote(parsed.path)))


def _s3_store(uri: str) -> ObjectStore:
    parsed = urlparse(uri)
    return S3Store(bucket=parsed.netloc, prefix=parsed.path)


STORE_BUILDERS: dict[str, Callable[[str], ObjectStore]] = {
    "file": _file_store,
    "s3": _s3_store,
}


def registry_uri_from_env(uri: str | None = None) -> str:
    """The registry to use: an explicit URI, else $LORAFLEET_REGISTRY, else the default."""
    return uri or os.environ.get("LORAFLEET_REGISTRY") or DEFAULT_REGISTRY


def open_store(uri: str) -> ObjectStore:
    """Build the backend for ``uri``; a bare path means a local directory."""
    if "://" not in uri:
        return FileStore(Path(uri))
    scheme = uri.split("://", 1)[0].lower()
    builder = STORE_BUILDERS.get(scheme)
    if builder is None:
        known = ", ".join(f"{s}://" for s in sorted(STORE_BUILDERS))
        raise RegistryConfigError(f"unknown registry scheme {scheme!r} in {uri!r}; use one of {known}")
    return builder(uri)


__all__ = [
    "DEFAULT_REGISTRY", "STORE_BUILDERS", "FileStore", "ObjectExists", "ObjectInfo", "ObjectStore",
    "PreconditionFailed", "S3Store", "StoredObject", "open_store", "registry_uri_from_env",
]
