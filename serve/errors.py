"""Serving's errors: requests, auth, capacity, settings. HTTP statuses: serve/errors_http.py."""

from __future__ import annotations

from lorafleet.errors import ErrorKind, LorafleetError


class RequestInvalid(LorafleetError):
    """A request parameter, or a serving setting, is out of its limits."""

    code = "invalid_request"
    kind = ErrorKind.invalid


class Unauthenticated(LorafleetError):
    code = "unauthenticated"
    kind = ErrorKind.unauthenticated


class Forbidden(LorafleetError):
    code = "forbidden"
    kind = ErrorKind.forbidden


class Overloaded(LorafleetError):
    """Every replica is busy and the queue is full: try again shortly."""

    code = "overloaded"
    kind = ErrorKind.overloaded


class ServiceUnavailable(LorafleetError):
    """Not ready yet, or a dependency (a replica, the registry) is down."""

    code = "unavailable"
    kind = ErrorKind.unavailable


class PinBudgetExceeded(LorafleetError):
    """Pinning this version would keep more bytes resident than cache.pinned_bytes allows."""

    code = "pin_budget_exceeded"
    kind = ErrorKind.conflict


class RequestTimeout(LorafleetError):
    code = "timeout"
    kind = ErrorKind.timeout
