"""The versioned adapter registry: publish, resolve, pull, alias, yank, gc.

Where each object lives in the store: ``registry/layout.py``.

Nothing read back from the store is trusted: a manifest is size-checked, parsed strictly and must
match the key it was read from before anything uses it.
"""

from __future__ import annotations

# Imports inside functions: parsing and validating tensors (torch) only at publish: listing and
# resolving never import torch.
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from lorafleet.bases.spec import BaseSpec

if TYPE_CHECKING:
    from .payload import AdapterPayload
from lorafleet.errors import LorafleetError

from .errors import (
    AdapterNotFound,
    IntegrityError,
    InvalidAdapter,
    InvalidReference,
    VersionConflict,
    VersionNotFound,
    YankedVersion,
)
from .identity import (
    LATEST,
    AdapterRef,
    sha256_bytes,
    sha256_stream,
    validate_alias,
    validate_digest,
    validate_name,
)
from .layout import (
    AliasRecord,
    YankRecord,
    blob_key,
    digest_index_entry,
    digest_index_key,
    digest_index_prefix,
    manifest_key,
    version_from_key,
    yank_key,
)
from .manifest import MAX_MANIFEST_BYTES, AdapterMethod, BaseRef, Manifest
from .pointers import VersionPointers, now
from .safetensors_io import AdapterLimits
from .storage import ObjectExists, ObjectInfo, ObjectStore, open_store, registry_uri_from_env

_PUBLISH_ATTEMPTS = 200


@dataclass
class PublishRequest:
    """Everything a publish records besides the weights."""

    name: str
    base: BaseSpec
    method: AdapterMethod = AdapterMethod.lora
    aliases: list[str] = field(default_factory=list)
    description: str = ""
    training_config: dict | None = None
    dataset_digest: str | None = None
    metrics: dict = field(default_factory=dict)
    lineage: dict[str, str] = field(default_factory=dict)


@dataclass
class GcReport:
    referenced: int
    removed: list[str]
    kept_recent: int
    bytes_freed: int
    unreadable: list[str] = field(default_factory=list)  # manifests that could not be parsed


@dataclass(frozen=True)
class Listing:
    """What `list` found: readable manifests, and the versions it had to skip (with why)."""

    manifests: list[Manifest]
    skipped: list[str]


class AdapterRegistry(VersionPointers):
    """The registry's Python API (the CLI and the server are thin layers over it). Aliases and pins:
    ``registry/pointers.py``."""

    def __init__(self, uri: str | None = None, *, store: ObjectStore | None = None,
                 limits: AdapterLimits | None = None):
        self.store = store or open_store(registry_uri_from_env(uri))
        self.uri = self.store.uri
        self.limits = limits or AdapterLimits()

    # ----------------------------------------------------------------------------- publish
    def publish(self, path: Path, request: PublishRequest) -> Manifest:
        """Read, convert and validate the adapter at ``path``, then publish it."""
        from .formats import read_adapter  # torch is imported only when publishing
        from .validation import check_declared_base

        self._check_request(request)
        payload = read_adapter(Path(path), request.base, self.limits)
        check_declared_base(payload.source_metadata, request.base)
        return self.publish_payload(payload, request)

    def publish_payload(self, payload: "AdapterPayload", request: PublishRequest) -> Manifest:
        from .validation import validate_payload

        self._check_request(request)
        validate_payload(payload, request.base, self.limits)
        data = payload.to_bytes({"base_fingerprint": request.base.fingerprint, "base_id": request.base.id})
        digest = sha256_bytes(data)
        fields = self._manifest_fields(payload, request, digest, len(data))
        _checked_manifest(fields)  # refuse before anything is stored
        self._put_blob(digest, data)
        manifest = self._create_manifest(fields)
        self._index_digest(manifest)
        for alias in request.aliases:
            self.set_alias(request.name, alias, manifest.version)
        return manifest

    def _check_request(self, request: PublishRequest) -> None:
        validate_name(request.name)
        for alias in request.aliases:
            validate_alias(alias)
        if len(request.description) > 4096:
            raise InvalidAdapter("description is longer than 4096 characters", field="description")

    def _put_blob(self, digest: str, data: bytes) -> None:
        with tempfile.NamedTemporaryFile(prefix="lorafleet-blob-", suffix=".safetensors") as tmp:
            tmp.write(data)
            tmp.flush()
            self.store.put_blob(blob_key(digest), Path(tmp.name))

    @staticmethod
    def _manifest_fields(payload: AdapterPayload, request: PublishRequest, digest: str, size: int) -> dict:
        first = next(iter(sorted(payload.components.items())), (None, None))[1]
        targets = [f"{c}.{m}" for c, cfg in sorted(payload.components.items()) for m in cfg.target_modules]
        return dict(
            name=request.name, digest=digest, size=size, format=payload.format, method=request.method,
            base=BaseRef(id=request.base.id, fingerprint=request.base.fingerprint),
            rank=first.rank if first else None, alpha=first.alpha if first else None,
            target_modules=targets, components=payload.components, trigger_tokens=payload.trigger_tokens,
            training_config=request.training_config, dataset_digest=request.dataset_digest,
            metrics=request.metrics, lineage=request.lineage, source_format=payload.source_format,
            num_parameters=payload.num_parameters, description=request.description,
        )

    def _index_digest(self, manifest: Manifest) -> bool:
        """Record the version under its digest; False when it already was."""
        try:
            self.store.create(digest_index_key(manifest.digest, manifest.name, manifest.version), b"")
        except ObjectExists:
            return False
        return True

    def _create_manifest(self, fields: dict) -> Manifest:
        name = fields["name"]
        for _ in range(_PUBLISH_ATTEMPTS):
            version = max(self._version_numbers(name), default=0) + 1
            manifest = Manifest(version=version, **fields)
            try:
                self.store.create(manifest_key(name, version), manifest.to_json_bytes())
                return manifest
            except ObjectExists:
                continue  # another publisher took this version; take the next one
        raise VersionConflict(f"could not allocate a version of {name!r} after {_PUBLISH_ATTEMPTS} tries")

    # ----------------------------------------------------------------------------- reading
    def _version_numbers(self, name: str) -> list[int]:
        return sorted(v for info in self.store.list(f"manifests/{name}/") if (v := version_from_key(info.key)))

    def _yanked_versions(self, name: str) -> set[int]:
        return {v for info in self.store.list(f"yanks/{name}/") if (v := version_from_key(info.key))}

    def names(self) -> list[str]:
        return sorted({info.key.split("/")[1] for info in self.store.list("manifests/")})

    def _read_manifest(self, name: str, version: int, yanked: set[int] | None = None) -> Manifest:
        stored = self.store.read(manifest_key(name, version))
        if stored is None:
            raise VersionNotFound(f"{name}@{version} does not exist", field="ref")
        manifest = self._trusted_manifest(name, version, stored.data)
        is_yanked = version in yanked if yanked is not None else self.store.exists(yank_key(name, version))
        if is_yanked:
            record = self._yank_record(name, version)
            manifest = manifest.model_copy(update={"yanked": True, "yanked_reason": record.reason if record else None})
        return manifest

    def _trusted_manifest(self, name: str, version: int, data: bytes) -> Manifest:
        """Parse a stored manifest and check it against its key and the limits, or IntegrityError."""
        where = f"manifest of {name}@{version}"
        if len(data) > MAX_MANIFEST_BYTES:
            raise IntegrityError(f"{where} is {len(data)} bytes (limit {MAX_MANIFEST_BYTES}); refused")
        try:
            manifest = Manifest.model_validate_json(data)
        except ValidationError as exc:
            fields = sorted({".".join(map(str, e["loc"])) for e in exc.errors()})
            raise IntegrityError(f"{where} is unreadable; bad fields: {', '.join(fields)}") from exc
        if (manifest.name, manifest.version) != (name, version):
            raise IntegrityError(f"{where} claims to be {manifest.name!r}@{manifest.version}; refused")
        if manifest.size > self.limits.max_file_bytes:
            raise IntegrityError(f"{where} claims {manifest.size} bytes, over the adapter size limit")
        return manifest

    def _yank_record(self, name: str, version: int) -> YankRecord | None:
        stored = self.store.read(yank_key(name, version))
        return YankRecord.model_validate_json(stored.data) if stored else None

    def versions(self, name: str) -> list[Manifest]:
        """Every readable version of ``name``, oldest first (manifests read in parallel)."""
        return self._listing_of(name).manifests

    def list(self, name: str | None = None) -> list[Manifest]:
        """All versions of ``name``, or the latest version of every adapter (unreadable skipped)."""
        return self.listing(name).manifests

    def listing(self, name: str | None = None) -> Listing:
        """Like ``list``, and says which versions were skipped because they cannot be read: one
        poisoned manifest must not hide every other adapter."""
        if name is not None:
            return self._listing_of(name)
        latest, skipped = [], []
        for adapter in self.names():
            try:
                latest.append(self.resolve(AdapterRef(adapter, alias=LATEST)))
            except (AdapterNotFound, YankedVersion):
                continue  # vanished, or every version yanked
            except IntegrityError as exc:
                skipped.append(str(exc))
        return Listing(latest, skipped)

    def _listing_of(self, name: str) -> Listing:
        validate_name(name)
        numbers = self._version_numbers(name)
        if not numbers:
            raise AdapterNotFound(f"no adapter named {name!r}", field="ref")
        yanked = self._yanked_versions(name)

        def read(version: int) -> Manifest | str:
            try:
                return self._read_manifest(name, version, yanked)
            except IntegrityError as exc:
                return str(exc)

        with ThreadPoolExecutor(max_workers=16) as pool:
            results = list(pool.map(read, numbers))
        return Listing([r for r in results if isinstance(r, Manifest)], [r for r in results if isinstance(r, str)])

    def resolve(self, ref: AdapterRef | str, key: str | None = None) -> Manifest:
        """The manifest a reference points to now (for an alias split: the version ``key`` falls on)."""
        ref = AdapterRef.parse(ref) if isinstance(ref, str) else ref
        if ref.version is not None:
            return self._read_manifest(ref.name, ref.version)
        if ref.digest is not None:
            return self._resolve_digest(ref)
        if ref.alias == LATEST:
            return self._resolve_latest(ref.name)
        return self.alias_target(self.alias_record(ref.name, ref.alias), key)

    def alias_target(self, record: AliasRecord, key: str | None = None) -> Manifest:
        """The manifest an alias serves to the caller ``key`` (a split picks one version per key)."""
        version = record.version_for(key)
        manifest = self._read_manifest(record.name, version)
        if manifest.yanked:
            raise YankedVersion(f"{record.name}:{record.alias} points to {record.name}@{version}, which is yanked; "
                                "move the alias", field="ref")
        return manifest

    def _resolve_latest(self, name: str) -> Manifest:
        numbers = self._version_numbers(name)
        if not numbers:
            raise AdapterNotFound(f"no adapter named {name!r}", field="ref")
        live = sorted(set(numbers) - self._yanked_versions(name))
        if not live:
            raise YankedVersion(f"every version of {name!r} is yanked", field="ref")
        return self._read_manifest(name, live[-1], set())

    def _indexed_versions(self, digest: str, name: str | None = None) -> list[tuple[str, int]]:
        """(name, version) pairs the digest index records for ``digest`` (one listing, no scan)."""
        entries = (digest_index_entry(info.key) for info in self.store.list(digest_index_prefix(digest)))
        return sorted(e for e in entries if e is not None and (name is None or e[0] == name))

    def _resolve_digest(self, ref: AdapterRef) -> Manifest:
        """Through the digest index: one listing and one manifest read, whatever the version count.
        Registries written before the index existed: `lorafleet registry reindex` (or `gc`)."""
        for name, version in reversed(self._indexed_versions(ref.digest, ref.name)):
            try:
                manifest = self._read_manifest(name, version)
            except VersionNotFound:
                continue  # deleted since it was indexed
            if manifest.digest == ref.digest:
                return manifest
        raise VersionNotFound(f"{ref.name} has no version with digest {ref.digest}", field="ref")

    def reindex(self) -> int:
        """Write the digest index entries of every readable version; returns how many were added."""
        return sum(self._index_digest(manifest) for name in self.names()
                   for manifest in self._listing_of(name).manifests)

    # ----------------------------------------------------------------------------- blobs
    def read_blob(self, manifest: Manifest) -> bytes:
        """The adapter's bytes, verified against the manifest's digest."""
        stream = self.store.open_blob(blob_key(manifest.digest))
        if stream is None:
            raise IntegrityError(f"blob of {manifest.adapter_id} ({manifest.digest}) is missing")
        try:
            data = stream.read(manifest.size + 1)
        finally:
            stream.close()
        if len(data) != manifest.size or sha256_bytes(data) != manifest.digest:
            raise IntegrityError(f"blob of {manifest.adapter_id} does not match its digest {manifest.digest}")
        return data

    def pull(self, ref: AdapterRef | str, destination: Path) -> tuple[Manifest, Path]:
        """Write the verified adapter file (and its manifest) into ``destination``."""
        manifest = self.resolve(ref)
        destination = Path(destination)
        destination.mkdir(parents=True, exist_ok=True)
        target = _inside(destination, f"{manifest.name}-v{manifest.version}.safetensors")
        manifest_path = _inside(destination, f"{manifest.name}-v{manifest.version}.manifest.json")
        self._download_verified(manifest, target)
        manifest_path.write_bytes(manifest.to_json_bytes())
        return manifest, target

    def _download_verified(self, manifest: Manifest, target: Path) -> None:
        stream = self.store.open_blob(blob_key(manifest.digest))
        if stream is None:
            raise IntegrityError(f"blob of {manifest.adapter_id} ({manifest.digest}) is missing")
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".pull-")
        try:
            with os.fdopen(fd, "w+b") as tmp:
                _copy(stream, tmp, manifest.size)
                tmp.seek(0)
                digest, size = sha256_stream(tmp)
            if digest != manifest.digest or size != manifest.size:
                raise IntegrityError(f"blob of {manifest.adapter_id} does not match its digest {manifest.digest}")
            os.replace(tmp_name, target)
        finally:
            stream.close()
            Path(tmp_name).unlink(missing_ok=True)

    # ----------------------------------------------------------------------------- evidence
    def store_evidence(self, document: dict) -> str:
        """Keep a JSON document (an eval report) content-addressed; its digest."""
        data = json.dumps(document, sort_keys=True, default=str).encode()
        digest = sha256_bytes(data)
        key = f"evals/sha256/{digest.split(':', 1)[1]}.json"
        if not self.store.exists(key):
            try:
                self.store.create(key, data)
            except ObjectExists:
                pass
        return digest

    def evidence(self, digest: str) -> dict | None:
        stored = self.store.read(f"evals/sha256/{validate_digest(digest).split(':', 1)[1]}.json")
        return json.loads(stored.data) if stored else None

    # ----------------------------------------------------------------------------- yank, gc
    def yank(self, ref: AdapterRef | str, reason: str = "") -> Manifest:
        manifest = self.resolve(ref)
        record = YankRecord(reason=reason[:1000], at=now())
        try:
            self.store.create(yank_key(manifest.name, manifest.version), record.model_dump_json().encode())
        except ObjectExists:
            pass  # already yanked: yanking is idempotent
        return self._read_manifest(manifest.name, manifest.version)

    def gc(self, *, grace_seconds: float = 3600.0, dry_run: bool = False) -> GcReport:
        """Remove blobs no manifest references and older than the grace period.

        The grace period protects a publish in flight (blob written, manifest not yet); a publish
        of bytes whose blob already exists refreshes the blob's timestamp. Right before each
        delete, the blob's timestamp and the digest index are read again. An unreadable manifest
        may reference any blob: while one exists, nothing is deleted (fix it or `delete --force`).
        """
        referenced, unreadable = self._referenced_digests()
        now, removed, kept, freed = time.time(), [], 0, 0
        for info in list(self.store.list("blobs/sha256/")):
            digest = "sha256:" + info.key.rsplit("/", 1)[-1]
            if digest in referenced:
                continue
            if unreadable or now - info.modified < grace_seconds or not self._still_unreferenced(info, digest):
                kept += 1
                continue
            if not dry_run:
                self.store.delete(info.key)
            removed.append(digest)
            freed += info.size
        return GcReport(referenced=len(referenced), removed=removed, kept_recent=kept, bytes_freed=freed,
                        unreadable=unreadable)

    def _referenced_digests(self) -> tuple[set[str], list[str]]:
        """Digests of every readable version (indexing any the index misses), and the versions
        that could not be read."""
        referenced, unreadable = set(), []
        for name in self.names():
            listing = self._listing_of(name)
            unreadable += listing.skipped
            for manifest in listing.manifests:
                referenced.add(manifest.digest)
                self._index_digest(manifest)
        return referenced, unreadable

    def _still_unreferenced(self, info: ObjectInfo, digest: str) -> bool:
        """Re-read just before deleting: a publish since the listing refreshed the blob or indexed it."""
        fresh = self.store.info(info.key)
        if fresh is None or fresh.modified > info.modified:
            return False
        return not any(self.store.exists(manifest_key(n, v)) for n, v in self._indexed_versions(digest))

    def delete(self, ref: str, *, force: bool = False) -> list[str]:
        """Remove one version's manifest (even an unreadable one) for an admin; its blob goes at
        the next gc. Returns the aliases that still point at it (they stop resolving)."""
        parsed = AdapterRef.parse(ref)
        if parsed.version is None:
            raise InvalidReference(f"delete takes NAME@VERSION, got {ref!r}", field="ref")
        if not force:
            raise InvalidReference("delete removes a version for good: pass force=True (--force)", field="force")
        name, version = parsed.name, parsed.version
        if not self.store.exists(manifest_key(name, version)):
            raise VersionNotFound(f"{name}@{version} does not exist", field="ref")
        self.store.delete(manifest_key(name, version))
        self.store.delete(yank_key(name, version))
        dangling = []
        for info in self.store.list(f"aliases/{name}/"):
            alias = info.key.rsplit("/", 1)[-1].removesuffix(".json")
            try:
                if self.alias_record(name, alias).version == version:
                    dangling.append(alias)
            except LorafleetError:
                continue
        return dangling

    def check(self) -> None:
        """Raise when the registry cannot be reached."""
        self.store.check()


def _checked_manifest(fields: dict) -> Manifest:
    """The manifest these fields make (version 1 as a stand-in), or InvalidAdapter naming the fields."""
    try:
        return Manifest(version=1, **fields)
    except ValidationError as exc:
        problems = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise InvalidAdapter("the adapter's manifest would be invalid", field="path", problems=problems) from exc


def _inside(directory: Path, file_name: str) -> Path:
    """``directory/file_name``, refused unless it resolves inside ``directory``."""
    root = directory.resolve()
    target = (root / file_name).resolve()
    if target.parent != root:
        raise IntegrityError(f"refusing to write {file_name!r} outside {root}")
    return target


def _copy(source, target, limit: int) -> None:
    remaining = limit + 1  # one byte more than expected reveals an oversized blob
    while remaining > 0:
        chunk = source.read(min(1 << 20, remaining))
        if not chunk:
            break
        target.write(chunk)
        remaining -= len(chunk)


__all__ = ["AdapterRegistry", "PublishRequest", "GcReport", "AliasRecord", "Listing"]
