"""Domain errors to HTTP, in one place: a table from error class to status code."""

from __future__ import annotations

from lorafleet.registry import errors as registry_errors
from lorafleet.registry.errors import (
    Forbidden,
    Overloaded,
    RequestInvalid,
    RequestTimeout,
    ServiceUnavailable,
    Unauthenticated,
)

STATUS_BY_ERROR: list[tuple[type[registry_errors.LorafleetError], int]] = [
    (Unauthenticated, 401),
    (Forbidden, 403),
    (registry_errors.AdapterNotFound, 404),  # includes VersionNotFound, AliasNotFound
    (registry_errors.YankedVersion, 404),
    (registry_errors.ReservedAlias, 409),
    (registry_errors.AliasConflict, 409),
    (registry_errors.VersionConflict, 409),
    (registry_errors.RegistryReadOnly, 409),
    (registry_errors.InvalidName, 422),
    (registry_errors.InvalidReference, 422),
    (registry_errors.AdapterIncompatible, 422),
    (registry_errors.InvalidAdapter, 422),
    (registry_errors.UnsafeFormat, 422),
    (registry_errors.AdapterTooLarge, 422),
    (RequestInvalid, 422),
    (registry_errors.IntegrityError, 502),
    (Overloaded, 503),
    (ServiceUnavailable, 503),
    (registry_errors.RegistryUnavailable, 503),
    (registry_errors.RegistryConfigError, 503),  # the server's registry setup, not the caller's fault
    (registry_errors.RegistryAccessDenied, 503),
    (RequestTimeout, 504),
]
RETRYABLE_STATUSES = frozenset({503})


def status_for(error: registry_errors.LorafleetError) -> int:
    for error_class, status in STATUS_BY_ERROR:
        if isinstance(error, error_class):
            return status
    return 500
