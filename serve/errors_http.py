"""Errors to HTTP, in one place: a table from error kind to status code."""

from __future__ import annotations

from lorafleet.errors import ErrorKind, LorafleetError

STATUS_BY_KIND: dict[ErrorKind, int] = {
    ErrorKind.invalid: 422,
    ErrorKind.not_found: 404,  # also a yanked version
    ErrorKind.conflict: 409,  # alias moved meanwhile, reserved alias, read-only registry, version race
    ErrorKind.unauthenticated: 401,
    ErrorKind.forbidden: 403,
    ErrorKind.too_large: 413,  # a dataset upload over trainings.max_upload_bytes
    ErrorKind.integrity: 502,  # stored bytes do not match their digest (never served)
    ErrorKind.unavailable: 503,  # no replica ready, registry down or misconfigured (not the caller's fault)
    ErrorKind.overloaded: 503,
    ErrorKind.rate_limited: 429,  # a tenant over its request or work rate, or its queue full
    ErrorKind.timeout: 504,
    ErrorKind.internal: 500,
}
RETRYABLE_STATUSES = frozenset({429, 503})


def status_for(error: LorafleetError) -> int:
    return STATUS_BY_KIND[error.kind]
