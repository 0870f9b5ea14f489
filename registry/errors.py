"""The registry's errors: names, references, adapter files, stored state, storage backends.

The base class and the kinds are in ``lorafleet/errors.py``; serving and training have their own
modules. The HTTP status of each kind is in one table (``serve/errors_http.py``).
"""

from __future__ import annotations

from lorafleet.errors import ErrorKind, LorafleetError


class InvalidName(LorafleetError):
    code = "invalid_name"
    kind = ErrorKind.invalid


class ReservedAlias(InvalidName):
    """A well-formed alias that only the registry may move (``latest``)."""

    code = "reserved_alias"
    kind = ErrorKind.conflict


class InvalidReference(LorafleetError):
    code = "invalid_reference"
    kind = ErrorKind.invalid


class AdapterNotFound(LorafleetError):
    code = "adapter_not_found"
    kind = ErrorKind.not_found


class VersionNotFound(AdapterNotFound):
    code = "version_not_found"


class AliasNotFound(AdapterNotFound):
    code = "alias_not_found"


class UnsafeFormat(LorafleetError):
    """A pickle-based or otherwise executable weights format was offered."""

    code = "unsafe_format"
    kind = ErrorKind.invalid


class InvalidAdapter(LorafleetError):
    """The adapter file cannot be read or is internally inconsistent."""

    code = "invalid_adapter"
    kind = ErrorKind.invalid


class AdapterIncompatible(LorafleetError):
    """The adapter does not fit the base model it is meant for."""

    code = "adapter_incompatible"
    kind = ErrorKind.invalid


class AdapterTooLarge(LorafleetError):
    code = "adapter_too_large"
    kind = ErrorKind.invalid


class IntegrityError(LorafleetError):
    """Stored bytes do not match their recorded digest."""

    code = "integrity_error"
    kind = ErrorKind.integrity


class VersionConflict(LorafleetError):
    """A create-once object already exists (someone else won the race)."""

    code = "version_conflict"
    kind = ErrorKind.conflict


class AliasConflict(LorafleetError):
    """An alias moved between our read and our compare-and-swap."""

    code = "alias_conflict"
    kind = ErrorKind.conflict


class YankedVersion(LorafleetError):
    code = "yanked_version"
    kind = ErrorKind.not_found


class RegistryUnavailable(LorafleetError):
    """The storage backend cannot be reached right now."""

    code = "registry_unavailable"
    kind = ErrorKind.unavailable


class RegistryReadOnly(LorafleetError):
    code = "registry_read_only"
    kind = ErrorKind.conflict


class RegistryConfigError(LorafleetError):
    """The registry is configured wrongly (unknown scheme, missing or invalid bucket...)."""

    code = "registry_config_error"
    kind = ErrorKind.unavailable


class RegistryAccessDenied(LorafleetError):
    """The storage refused our credentials or policy for this bucket/key."""

    code = "registry_access_denied"
    kind = ErrorKind.unavailable
