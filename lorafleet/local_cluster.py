"""What a process needs to start a local Ray cluster safely: Ray token auth and free ports.

Ray 2.60 supports token auth for local clusters (gRPC, the dashboard and the Jobs API all check
it). A cluster lorafleet starts itself gets a fresh random token, kept in this process's
environment only: the raylet, the workers and job entrypoints inherit it; it is never put into a
runtime_env, which Ray stores and shows. An explicit ``RAY_AUTH_MODE`` (``token`` with your own
token, or ``disabled``) is respected.
"""

from __future__ import annotations

# Imports inside functions: Ray's internals only when Ray is already imported (this module must
# not import Ray itself).
import os
import secrets
import socket
import sys
from contextlib import closing

AUTH_MODE = "RAY_AUTH_MODE"
AUTH_TOKEN = "RAY_AUTH_TOKEN"


_PROCESS_TOKEN: list[str] = []  # Ray's token loader caches the first token it reads: one per process


def secure_local_ray() -> str:
    """Turn Ray token auth on for a cluster about to be started here (unless a mode is set);
    returns the mode in force."""
    if os.environ.get(AUTH_MODE):
        return os.environ[AUTH_MODE]
    os.environ[AUTH_MODE] = "token"
    if not os.environ.get(AUTH_TOKEN) and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
        if not _PROCESS_TOKEN:
            _PROCESS_TOKEN.append(secrets.token_hex(32))
        os.environ[AUTH_TOKEN] = _PROCESS_TOKEN[0]
    _refresh_ray_config()
    return "token"


def _refresh_ray_config() -> None:
    """Ray caches its config (the auth mode among it) when first imported; re-read it, as Ray's own
    token set-up does (ray._private.authentication.authentication_token_setup._enable_token_auth)."""
    if "ray" in sys.modules:
        from ray._raylet import Config

        Config.initialize("")


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SECRET_MARKERS = ("SECRET", "TOKEN", "PASSWORD", "CREDENTIAL", "PRIVATE")


def job_env(environ: dict[str, str]) -> dict[str, str]:
    """The settings a Ray job may carry in its runtime_env: lorafleet and AWS *settings*, never
    secrets (keys, tokens, passwords), which the workers must already have (a Secret mount, or
    the environment a local cluster inherits)."""
    return {k: v for k, v in environ.items()
            if k.startswith(("AWS_", "LORAFLEET_")) and k != "AWS_ACCESS_KEY_ID"
            and not any(marker in k for marker in SECRET_MARKERS)}
