"""Records that point at versions: aliases (with canary splits and their history) and pins.

Each is one small JSON object per name (``registry/layout.py``), moved only by compare-and-swap:
a writer that lost a race reads the record again and retries, so two moves never overwrite each
other blindly.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import TypeVar

from pydantic import BaseModel

from .errors import AliasConflict, AliasNotFound, InvalidAdapter, YankedVersion
from .identity import validate_alias, validate_name, validate_version
from .layout import AliasMove, AliasRecord, PinRecord, alias_key, pin_key
from .manifest import Manifest
from .storage import ObjectStore, PreconditionFailed

SWAP_ATTEMPTS = 200
ALIAS_HISTORY = 50
MAX_SPLIT_VERSIONS = 8
R = TypeVar("R", bound=BaseModel)


def now() -> datetime:
    return datetime.now(timezone.utc)


def swap_record(store: ObjectStore, key: str, record_class: type[R], moved: Callable[[R | None], R],
                conflict: AliasConflict) -> R:
    """Replace the record at ``key`` with ``moved(current)`` by compare-and-swap, retrying lost races."""
    for _ in range(SWAP_ATTEMPTS):
        stored = store.read(key)
        record = moved(record_class.model_validate_json(stored.data) if stored else None)
        try:
            store.compare_and_swap(key, record.model_dump_json(indent=2).encode(), stored.token if stored else None)
            return record
        except PreconditionFailed:
            continue
    raise conflict


class VersionPointers:
    """Aliases and pins of an AdapterRegistry (mixed into it: uses its ``store`` and ``_read_manifest``)."""

    store: ObjectStore

    def _read_manifest(self, name: str, version: int, yanked: set[int] | None = None) -> Manifest:
        raise NotImplementedError

    # ----------------------------------------------------------------------------- aliases
    def alias_record(self, name: str, alias: str) -> AliasRecord:
        validate_name(name)
        validate_alias(alias)
        stored = self.store.read(alias_key(name, alias))
        if stored is None:
            raise AliasNotFound(f"{name} has no alias {alias!r}", field="ref")
        return AliasRecord.model_validate_json(stored.data)

    def aliases(self, name: str) -> dict[str, int]:
        validate_name(name)
        result = {}
        for info in self.store.list(f"aliases/{name}/"):
            alias = info.key.rsplit("/", 1)[-1].removesuffix(".json")
            result[alias] = self.alias_record(name, alias).version
        return result

    def set_alias(self, name: str, alias: str, version: int, *, expected_version: int | None = None,
                  evidence: str | None = None) -> AliasRecord:
        """Point ``name:alias`` at ``version`` by compare-and-swap, retrying lost races (ending any split).

        With ``expected_version`` the move happens only if the alias still points there; ``evidence``
        (e.g. an eval report's digest) is kept in the alias's history.
        """
        return self._write_alias(name, alias, {version: 1.0}, expected_version, field="version", evidence=evidence)

    def split_alias(self, name: str, alias: str, weights: dict[int, float], *,
                    expected_version: int | None = None) -> AliasRecord:
        """A canary: ``name:alias`` serves each version to its share of callers (weights sum to 1),
        sticky per caller key. Moving the alias to one version ends the split."""
        if not 1 <= len(weights) <= MAX_SPLIT_VERSIONS:
            raise InvalidAdapter(f"a split names 1 to {MAX_SPLIT_VERSIONS} versions", field="weights")
        if any(not 0 < w <= 1 for w in weights.values()) or abs(sum(weights.values()) - 1) > 1e-6:
            raise InvalidAdapter(f"split weights must be in (0, 1] and sum to 1, got {weights}", field="weights")
        return self._write_alias(name, alias, weights, expected_version, field="weights")

    def _write_alias(self, name: str, alias: str, weights: dict[int, float], expected_version: int | None,
                     field: str, evidence: str | None = None) -> AliasRecord:
        validate_name(name)
        validate_alias(alias)
        for version in weights:
            validate_version(version)
            if self._read_manifest(name, version).yanked:
                raise YankedVersion(f"{name}@{version} is yanked; an alias cannot point to it", field=field)
        split = dict(sorted(weights.items())) if len(weights) > 1 else None
        version = max(weights, key=lambda v: (weights[v], v))

        def moved(current: AliasRecord | None) -> AliasRecord:
            if expected_version is not None and (current is None or current.version != expected_version):
                raise AliasConflict(f"{name}:{alias} no longer points to version {expected_version}", field="alias")
            return _moved(name, alias, version, current, split, evidence)

        return swap_record(self.store, alias_key(name, alias), AliasRecord, moved,
                           AliasConflict(f"{name}:{alias} kept moving; try again", field="alias"))

    # ----------------------------------------------------------------------------- pins
    def pin(self, name: str, version: int) -> PinRecord:
        """Keep ``name@version`` resident on every serving replica (replaces the name's pin)."""
        manifest = self._read_manifest(validate_name(name), validate_version(version))
        if manifest.yanked:
            raise YankedVersion(f"{name}@{version} is yanked; it cannot be pinned", field="version")
        record = PinRecord(name=name, version=version, digest=manifest.digest, size=manifest.size, pinned_at=now())
        return swap_record(self.store, pin_key(name), PinRecord, lambda _current: record,
                           AliasConflict(f"the pin of {name} kept changing; try again", field="name"))

    def unpin(self, name: str) -> bool:
        """Whether ``name`` had a pin (now removed)."""
        key = pin_key(validate_name(name))
        found = self.store.exists(key)
        self.store.delete(key)
        return found

    def pins(self) -> list[PinRecord]:
        found = []
        for info in self.store.list("pins/"):
            stored = self.store.read(info.key)
            if stored is not None:
                found.append(PinRecord.model_validate_json(stored.data))
        return sorted(found, key=lambda p: p.name)


def _moved(name: str, alias: str, version: int, current: AliasRecord | None,
           split: dict[int, float] | None = None, evidence: str | None = None) -> AliasRecord:
    history = (current.history if current else []) + [AliasMove(version=version, at=now(), split=split,
                                                                evidence=evidence)]
    return AliasRecord(name=name, alias=alias, version=version, revision=(current.revision + 1) if current else 1,
                       updated_at=now(), history=history[-ALIAS_HISTORY:], split=split)
