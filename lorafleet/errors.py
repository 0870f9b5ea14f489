"""The base of every error lorafleet raises on purpose, and the kinds of failure.

Every error carries a stable ``code``, a ``kind`` and, where one input is at fault, the ``field``
that names it. Each domain defines its own errors in its own package (``registry/errors.py``,
``serve/errors.py``, ``training/errors.py``); errors of the core (base models) are here. Nothing
here knows HTTP: the API layer maps kinds to status codes in one table (``serve/errors_http.py``)
and the CLI prints ``message`` and exits non-zero.
"""

from __future__ import annotations

from enum import Enum


class ErrorKind(str, Enum):
    """What kind of failure an error is, independent of the domain that raises it."""

    invalid = "invalid"  # the caller's input is wrong (a field names it)
    not_found = "not_found"
    conflict = "conflict"  # lost a race, or the target's state forbids it
    unauthenticated = "unauthenticated"
    forbidden = "forbidden"
    too_large = "too_large"  # an upload over its limit
    rate_limited = "rate_limited"  # a tenant over its rate: try again after the time it is told
    integrity = "integrity"  # stored bytes do not match what was recorded
    unavailable = "unavailable"  # a dependency (registry, replica) cannot serve now, or is misconfigured
    overloaded = "overloaded"  # full: try again shortly
    timeout = "timeout"
    internal = "internal"  # a failure that is nobody's input


class LorafleetError(Exception):
    """Base of every error lorafleet raises on purpose."""

    code = "lorafleet_error"
    kind = ErrorKind.internal

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


class BaseModelError(LorafleetError):
    """A base model cannot be found, built or loaded."""

    code = "base_model_error"
