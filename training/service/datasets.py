"""Datasets as stored things: an archive in, checked like `data prepare`, stored by digest.

A dataset is stored as one canonical tar (sorted names, no timestamps or owners) of the files
training reads: the usable images, their caption files and metadata.jsonl. Its digest is the
sha256 of that tar, so the same images and captions give the same digest whatever archive they
came in, and a training names its data by that digest.

    datasets/sha256/<hex>/data.tar      the files
    datasets/sha256/<hex>/report.json   what was kept, skipped (with reasons) and ignored
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from pydantic import BaseModel, Field

from lorafleet.registry.storage import ObjectStore, open_store

from ..config import DataConfig
from ..data import DEFAULT_MAX_FILE_BYTES, IMAGE_SUFFIXES, scan
from ..errors import DatasetInvalid, DatasetNotFound, DatasetTooLarge

DIGEST_PATTERN = r"sha256:[0-9a-f]{64}"
_DIGEST = re.compile(f"^{DIGEST_PATTERN}$")
CAPTION_FILES = frozenset({"metadata.jsonl"})
_COPY_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class DatasetLimits:
    max_upload_bytes: int = 1024**3
    max_files: int = 20_000
    max_unpacked_bytes: int = 4 * 1024**3
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES


class DatasetReport(BaseModel):
    """What `GET /v1/datasets/{digest}` shows (and `data prepare` would say)."""

    digest: str = Field(pattern=f"^{DIGEST_PATTERN}$")
    size_bytes: int
    images: int = Field(description="Usable images (stored).")
    skipped: dict[str, list[str]] = Field(description="Images not stored, by reason.")
    missing_captions: list[str]
    caption_words: dict[str, float]
    captions_outside_recommended: int
    ignored: list[str] = Field(description="Archive members that are neither images nor captions (first 100).")
    source: str = Field(description="upload, or the URI it was read from.")
    created_at: datetime


def check_digest(digest: str) -> str:
    if not _DIGEST.fullmatch(digest):
        raise DatasetInvalid(f"dataset digest must look like sha256:<64 hex>, got {digest[:80]!r}", field="dataset")
    return digest


def _prefix(digest: str) -> str:
    return f"datasets/sha256/{check_digest(digest).split(':', 1)[1]}/"


def copy_limited(source: BinaryIO, target: BinaryIO, limit: int, what: str) -> int:
    """Copy at most ``limit`` bytes; DatasetTooLarge beyond it."""
    copied = 0
    while chunk := source.read(_COPY_CHUNK):
        copied += len(chunk)
        if copied > limit:
            raise DatasetTooLarge(f"{what} is over {limit} bytes", field="file")
        target.write(chunk)
    return copied


class _Unpacker:
    """Regular files of a zip or tar, by safe relative name, within the limits."""

    def __init__(self, archive: Path, limits: DatasetLimits):
        self.archive, self.limits = archive, limits
        self.files, self.unpacked = 0, 0

    def members(self) -> Iterator[tuple[PurePosixPath, BinaryIO]]:
        if zipfile.is_zipfile(self.archive):
            yield from self._zip()
        elif _is_tar(self.archive):
            yield from self._tar()
        else:
            raise DatasetInvalid("the upload is not a zip or tar archive (tar.gz, tar.bz2, tar.xz too)", field="file")

    def _count(self, name: str, size: int) -> None:
        self.files += 1
        self.unpacked += size
        if self.files > self.limits.max_files:
            raise DatasetTooLarge(f"the archive holds more than {self.limits.max_files} files", field="file")
        if self.unpacked > self.limits.max_unpacked_bytes:
            raise DatasetTooLarge(f"the archive unpacks to more than {self.limits.max_unpacked_bytes} bytes",
                                  field="file")

    def _zip(self):
        try:
            with zipfile.ZipFile(self.archive) as archive:
                for info in archive.infolist():
                    path = _safe_name(info.filename)
                    if info.is_dir() or path is None or _is_link(info):
                        continue
                    self._count(info.filename, info.file_size)
                    with archive.open(info) as handle:
                        yield path, handle
        except (zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError) as exc:
            raise DatasetInvalid(f"the zip archive is corrupt or unsupported: {exc}", field="file") from exc

    def _tar(self):
        try:
            with tarfile.open(self.archive, mode="r:*") as archive:
                for info in archive:
                    path = _safe_name(info.name)
                    if not info.isreg() or path is None:  # links, devices, folders: never followed
                        continue
                    self._count(info.name, info.size)
                    handle = archive.extractfile(info)
                    if handle is not None:
                        yield path, handle
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DatasetInvalid(f"the tar archive is corrupt: {exc}", field="file") from exc


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except (OSError, tarfile.TarError, EOFError):
        return False


def _is_link(info: zipfile.ZipInfo) -> bool:
    return (info.external_attr >> 16) & 0o170000 == 0o120000


def _safe_name(name: str) -> PurePosixPath | None:
    """A member's relative path, or None for absolute, parent-escaping or hidden ones."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or not path.parts or any(p in {"..", ""} for p in path.parts):
        return None
    if any(part.startswith(".") or part == "__MACOSX" for part in path.parts):
        return None
    return path


def _strip_common_folder(names: list[PurePosixPath]) -> int:
    """How many leading folders every member shares (a zip of a folder holds 'folder/...')."""
    depth = 0
    while names and all(len(n.parts) > depth + 1 for n in names) and len({n.parts[depth] for n in names}) == 1:
        depth += 1
    return depth


class DatasetStore:
    """Datasets in an object store (the registry's by default)."""

    def __init__(self, store: ObjectStore, limits: DatasetLimits | None = None):
        self.store = store
        self.limits = limits or DatasetLimits()

    # ------------------------------------------------------------------ ingest
    def ingest_archive(self, archive: Path, source: str = "upload") -> DatasetReport:
        """Unpack, check, store; the report (DatasetInvalid when no image is usable)."""
        with tempfile.TemporaryDirectory(prefix="lorafleet-dataset-") as workdir:
            folder, ignored = self._unpack(archive, Path(workdir) / "files")
            examples, data_report = scan(DataConfig(path=folder, max_file_bytes=self.limits.max_file_bytes))
            if not examples:
                raise DatasetInvalid(f"no usable image in the dataset: {data_report.summary()}"
                                     + (f"; ignored {', '.join(ignored[:5])}" if ignored else ""), field="file")
            canonical = Path(workdir) / "data.tar"
            keep = sorted({e.path.name for e in examples} | _captions_of(folder, examples))
            digest = _write_canonical_tar(folder, keep, canonical)
            report = DatasetReport(
                digest=digest, size_bytes=canonical.stat().st_size, images=len(examples),
                skipped={k: v for k, v in data_report.skipped.items() if v},
                missing_captions=data_report.missing_captions, caption_words=data_report.caption_words,
                captions_outside_recommended=data_report.captions_outside_recommended, ignored=ignored[:100],
                source=source, created_at=datetime.now(timezone.utc))
            prefix = _prefix(digest)
            self.store.put_blob(prefix + "data.tar", canonical)
            if not self.store.exists(prefix + "report.json"):
                self.store.compare_and_swap(prefix + "report.json", report.model_dump_json(indent=2).encode(), None)
            return report  # this upload's (the stored report is the first upload's of the same files)

    def ingest_uri(self, uri: str, allowed_prefixes: list[str]) -> DatasetReport:
        """An archive the server reads itself (only under an allowed prefix)."""
        if not any(uri.startswith(prefix) for prefix in allowed_prefixes):
            raise DatasetInvalid(f"the server may not read {uri!r}: allowed prefixes are "
                                 f"{allowed_prefixes or 'none (trainings.dataset_uri_prefixes)'}", field="uri")
        location, _, key = uri.rstrip("/").rpartition("/")
        if not key or "://" not in location + "/":
            raise DatasetInvalid(f"{uri!r} does not name an archive", field="uri")
        try:
            source = open_store(location).open_blob(key)
        except (ValueError, OSError) as exc:
            raise DatasetInvalid(f"cannot read {uri!r}: {exc}", field="uri") from exc
        if source is None:
            raise DatasetInvalid(f"nothing at {uri!r}", field="uri")
        with source, tempfile.NamedTemporaryFile(prefix="lorafleet-upload-") as archive:
            copy_limited(source, archive, self.limits.max_upload_bytes, uri)
            archive.flush()
            return self.ingest_archive(Path(archive.name), source=uri)

    def _unpack(self, archive: Path, folder: Path) -> tuple[Path, list[str]]:
        members = []
        folder.mkdir(parents=True)
        spool = folder.parent / "members"
        spool.mkdir()
        unpacker = _Unpacker(archive, self.limits)
        for index, (path, handle) in enumerate(unpacker.members()):
            target = spool / f"{index:06d}"
            with target.open("wb") as out:
                copy_limited(handle, out, self.limits.max_unpacked_bytes, str(path))
            members.append((path, target))
        depth = _strip_common_folder([p for p, _ in members])
        ignored = []
        for path, stored in members:
            relative = PurePosixPath(*path.parts[depth:])
            usable = len(relative.parts) == 1 and (relative.suffix.lower() in IMAGE_SUFFIXES | {".txt"}
                                                   or relative.name in CAPTION_FILES)
            if not usable or (folder / relative.name).exists():
                ignored.append(str(path))
                continue
            stored.rename(folder / relative.name)
        return folder, ignored

    # ------------------------------------------------------------------ read
    def report(self, digest: str) -> DatasetReport:
        stored = self.store.read(_prefix(digest) + "report.json")
        if stored is None:
            raise DatasetNotFound(f"no dataset {digest}", field="dataset")
        return DatasetReport.model_validate_json(stored.data)

    def materialize(self, digest: str, folder: Path) -> Path:
        """The dataset's files in ``folder`` (for a training run)."""
        blob = self.store.open_blob(_prefix(digest) + "data.tar")
        if blob is None:
            raise DatasetNotFound(f"no dataset {digest}", field="dataset")
        folder.mkdir(parents=True, exist_ok=True)
        hasher = hashlib.sha256()
        with blob, tempfile.NamedTemporaryFile(prefix="lorafleet-dataset-") as local:
            while chunk := blob.read(_COPY_CHUNK):
                hasher.update(chunk)
                local.write(chunk)
            local.flush()
            if "sha256:" + hasher.hexdigest() != digest:
                raise DatasetInvalid(f"stored dataset {digest} does not match its digest", field="dataset")
            with tarfile.open(local.name) as archive:
                for info in archive:
                    path = _safe_name(info.name)
                    if info.isreg() and path is not None and len(path.parts) == 1:
                        with archive.extractfile(info) as handle, (folder / path.name).open("wb") as out:
                            shutil.copyfileobj(handle, out)
        return folder


def _captions_of(folder: Path, examples) -> set[str]:
    names = {f"{e.path.stem}.txt" for e in examples if (folder / f"{e.path.stem}.txt").is_file()}
    return names | {name for name in CAPTION_FILES if (folder / name).is_file()}


def _write_canonical_tar(folder: Path, names: list[str], target: Path) -> str:
    hasher = hashlib.sha256()
    with tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as archive:
        for name in names:
            data = (folder / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            archive.addfile(info, io.BytesIO(data))
    with target.open("rb") as handle:
        while chunk := handle.read(_COPY_CHUNK):
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()

