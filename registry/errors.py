"""Domain errors of lorafleet (registry, serving, training), in one module.

Every error carries a stable ``code`` and, where one input is at fault, the ``field`` that names
it. Nothing here knows about HTTP: the API layer maps codes to status codes in one table
(``serve/errors_http.py``) and the CLI prints ``message`` and exits non-zero.
"""

from __future__ import annotations


class LorafleetError(Exception):
    """Base of every error lorafleet raises on purpose."""

    code = "lorafleet_error"

    def __init__(self, message: str, *, field: str | None = None, problems: list[str] | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.problems = list(problems or [])

    def __str__(self) -> str:
        if not self.problems:
            return self.message
        listed = "\n".join(f"  - {p}" for p in self.problems)
        return f"{self.message}\n{listed}"

    def to_dict(self) -> dict:
        body = {"code": self.code, "message": self.message, "field": self.field}
        if self.problems:
            body["problems"] = self.problems
        return body


class InvalidName(LorafleetError):
    code = "invalid_name"


class ReservedAlias(InvalidName):
    """A well-formed alias that only the registry may move (``latest``)."""

    code = "reserved_alias"


class InvalidReference(LorafleetError):
    code = "invalid_reference"


class AdapterNotFound(LorafleetError):
    code = "adapter_not_found"


class VersionNotFound(AdapterNotFound):
    code = "version_not_found"


class AliasNotFound(AdapterNotFound):
    code = "alias_not_found"


class UnsafeFormat(LorafleetError):
    """A pickle-based or otherwise executable weights format was offered."""

    code = "unsafe_format"


class InvalidAdapter(LorafleetError):
    """The adapter file cannot be read or is internally inconsistent."""

    code = "invalid_adapter"


class AdapterIncompatible(LorafleetError):
    """The adapter does not fit the base model it is meant for."""

    code = "adapter_incompatible"


class AdapterTooLarge(LorafleetError):
    code = "adapter_too_large"


class IntegrityError(LorafleetError):
    """Stored bytes do not match their recorded digest."""

    code = "integrity_error"


class VersionConflict(LorafleetError):
    """A create-once object already exists (someone else won the race)."""

    code = "version_conflict"


class AliasConflict(LorafleetError):
    """An alias moved between our read and our compare-and-swap."""

    code = "alias_conflict"


class YankedVersion(LorafleetError):
    code = "yanked_version"


class RegistryUnavailable(LorafleetError):
    """The storage backend cannot be reached right now."""

    code = "registry_unavailable"


class RegistryReadOnly(LorafleetError):
    code = "registry_read_only"


class RegistryConfigError(LorafleetError):
    """The registry is configured wrongly (unknown scheme, missing or invalid bucket...)."""

    code = "registry_config_error"


class RegistryAccessDenied(LorafleetError):
    """The storage refused our credentials or policy for this bucket/key."""

    code = "registry_access_denied"


class BaseModelError(LorafleetError):
    """A base model cannot be found, built or loaded."""

    code = "base_model_error"


# --- serving -------------------------------------------------------------------------------


class RequestInvalid(LorafleetError):
    """A request parameter is out of the configured limits."""

    code = "invalid_request"


class Unauthenticated(LorafleetError):
    code = "unauthenticated"


class Forbidden(LorafleetError):
    code = "forbidden"


class Overloaded(LorafleetError):
    """Every replica is busy and the queue is full: try again shortly."""

    code = "overloaded"


class ServiceUnavailable(LorafleetError):
    """Not ready yet, or a dependency (a replica, the registry) is down."""

    code = "unavailable"


class RequestTimeout(LorafleetError):
    code = "timeout"
