"""Local-directory backend: ``file:///absolute/path``.

Create-once is an exclusive hard link of a fully written temporary file (readers never see a
partial object); compare-and-swap holds an ``flock`` on a sidecar lock file while it reads,
compares and atomically renames.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from ..errors import RegistryConfigError, RegistryReadOnly, RegistryUnavailable
from .base import ObjectExists, ObjectInfo, ObjectStore, PreconditionFailed, StoredObject, check_key

_TMP = ".tmp"
_LOCKS = ".locks"


def _token(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextmanager
def _write_errors(root: Path):
    """Turn OS write failures into registry errors that name the directory."""
    try:
        yield
    except PermissionError as exc:
        raise RegistryReadOnly(f"registry directory {root} is not writable: {exc.strerror}") from exc
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES):
            raise RegistryReadOnly(f"registry directory {root} is read-only") from exc
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise RegistryUnavailable(f"registry directory {root} is full") from exc
        raise


class FileStore(ObjectStore):
    def __init__(self, root: Path):
        self.root = root.expanduser().resolve()
        self.uri = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
        if self.root not in path.parents:
            raise ValueError(f"storage key {key!r} escapes {self.root}")
        return path

    def _temp_file(self) -> tuple[int, Path]:
        tmp_dir = self.root / _TMP
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="w-")
        return fd, Path(name)

    def _write_temp(self, data: bytes) -> Path:
        fd, tmp = self._temp_file()
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return tmp

    def read(self, key: str) -> StoredObject | None:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        return StoredObject(data=data, token=_token(data))

    def create(self, key: str, data: bytes) -> None:
        path = self._path(key)
        with _write_errors(self.root):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._write_temp(data)
            try:
                os.link(tmp, path)  # atomic and exclusive: fails if path exists
            except FileExistsError as exc:
                raise ObjectExists(f"{key} already exists") from exc
            finally:
                tmp.unlink(missing_ok=True)

    @contextmanager
    def _locked(self, key: str):
        lock_path = self.root / _LOCKS / (check_key(key).replace("/", "__") + ".lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def compare_and_swap(self, key: str, data: bytes, expected_token: str | None) -> None:
        path = self._path(key)
        with _write_errors(self.root), self._locked(key):
            current = self.read(key)
            current_token = current.token if current else None
            if current_token != expected_token:
                raise PreconditionFailed(f"{key} changed since it was read")
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self._write_temp(data), path)

    def put_blob(self, key: str, source: Path) -> None:
        path = self._path(key)
        with _write_errors(self.root):
            if path.exists():
                os.utime(path)  # a re-publish refreshes the blob, so gc's grace period starts again
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = self._temp_file()
            with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)

    def open_blob(self, key: str) -> BinaryIO | None:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def info(self, key: str) -> ObjectInfo | None:
        try:
            stat = self._path(key).stat()
        except FileNotFoundError:
            return None
        return ObjectInfo(key, stat.st_size, stat.st_mtime)

    def delete(self, key: str) -> None:
        with _write_errors(self.root):
            self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in sorted(filenames):
                full = Path(dirpath, filename)
                stat = full.stat()
                yield ObjectInfo(str(full.relative_to(self.root)), stat.st_size, stat.st_mtime)

    def check(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise RegistryConfigError(f"registry path {self.root} is not a directory")
