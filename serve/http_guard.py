"""The HTTP door, before any route runs: who is calling, and how much they may send.

A pure ASGI middleware (so it runs before FastAPI reads or parses a byte of the body):

1. the caller's scopes come from the bearer token (constant-time compare, serve/auth.py) and are
   put on ``request.state.scopes`` for routes that show more to some callers;
2. a route that needs a scope the caller lacks is answered 401/403 without reading the body;
3. a body over ``max_body_bytes`` is answered 413: by its Content-Length at once, or by counting
   the streamed bytes when there is none. The body is then replayed to the app. Dataset uploads
   are the one exception: they stream through to their route, which counts them against
   ``trainings.max_upload_bytes`` as it writes them to disk.
"""

from __future__ import annotations

import json
import re

from .auth import TokenTable

OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # anonymous callers get their status only
_ADMIN_ROUTES = [("PUT", re.compile(r"^/v1/adapters/[^/]+/aliases/[^/]+$")), ("GET", re.compile(r"^/v1/usage/?$")),
                 ("PUT", re.compile(r"^/v1/adapters/[^/]+/pin$")), ("DELETE", re.compile(r"^/v1/adapters/[^/]+/pin$"))]
_TRAIN_PATHS = re.compile(r"^/v1/(datasets|trainings)(/.*)?$")
UPLOAD_ROUTE = ("POST", "/v1/datasets")
_METRICS_PATHS = frozenset({"/metrics"})


def required_scope(method: str, path: str) -> str | None:
    """The scope a route needs (None: open). Unknown paths need a token too (no probing)."""
    if path in OPEN_PATHS:
        return None
    if path in _METRICS_PATHS:
        return "metrics"
    if any(method == m and pattern.match(path) for m, pattern in _ADMIN_ROUTES):
        return "admin"
    if _TRAIN_PATHS.match(path):
        return "train"
    return "generate"


class _BodyTooLarge(Exception):
    pass


class RequestGuard:
    def __init__(self, app, tokens: TokenTable, max_body_bytes: int, max_upload_bytes: int | None = None):
        self.app = app
        self.tokens = tokens
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        authorization = headers.get(b"authorization", b"").decode("latin-1") or None
        identity = self.tokens.identify(authorization)
        granted = identity.scopes
        state = scope.setdefault("state", {})
        state["scopes"], state["tenant"] = granted, identity.tenant
        needed = required_scope(scope["method"], scope["path"])
        if needed is not None and needed not in granted:
            return await _refuse_scope(send, needed, bool(authorization), bool(granted))
        declared = headers.get(b"content-length")
        limit = self._limit_for(scope["method"], scope["path"])
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await self._too_large(send, limit)
        if limit != self.max_body_bytes:  # an upload: streamed to its route, which counts it
            return await self.app(scope, receive, send)
        try:
            body = await self._read_body(receive)
        except _BodyTooLarge:
            return await self._too_large(send, self.max_body_bytes)
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)  # the client went away
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                raise _BodyTooLarge
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _limit_for(self, method: str, path: str) -> int:
        if self.max_upload_bytes is not None and (method, path.rstrip("/")) == UPLOAD_ROUTE:
            return self.max_upload_bytes
        return self.max_body_bytes

    async def _too_large(self, send, limit: int) -> None:
        await _send_error(send, 413, "body_too_large", f"request body is over {limit} bytes", "body",
                          {b"connection": b"close"})


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later messages: a disconnect

    return replayed


async def _refuse_scope(send, needed: str, presented: bool, valid: bool) -> None:
    if valid:
        await _send_error(send, 403, "forbidden", f"this token lacks the '{needed}' scope", "authorization")
    else:
        message = "invalid token" if presented else "missing bearer token"
        await _send_error(send, 401, "unauthenticated", message, "authorization", {b"www-authenticate": b"Bearer"})


async def _send_error(send, status: int, code: str, message: str, field: str, extra: dict | None = None) -> None:
    body = json.dumps({"error": {"code": code, "message": message, "field": field}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += list((extra or {}).items())
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
