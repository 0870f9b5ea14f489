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
import random
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


# Ports lorafleet picks for the servers it starts (Serve's HTTP port, HAProxy's stats and metrics,
# the dashboard, SeaweedFS, PostgreSQL): between Ray's worker ports (10002-19999) and Serve's replica
# ports (30000-31000), and never in the kernel's ephemeral range, which binding to port 0 and every
# outgoing connection draw from: a port picked there can be taken by another socket (one of Ray's,
# say) before its server binds it.
PICKED_PORTS = range(20000, 30000)
_TRIES = 256


def free_port() -> int:
    """A TCP port free on this machine now that no other socket is handed meanwhile (PICKED_PORTS)."""
    ephemeral = _ephemeral_ports()
    candidates = [port for port in PICKED_PORTS if port not in ephemeral]
    for port in random.sample(candidates, min(len(candidates), _TRIES)):
        if _bindable(port):
            return port
    raise RuntimeError(f"no free port in {PICKED_PORTS.start}-{PICKED_PORTS.stop - 1} outside the "
                       f"ephemeral range {ephemeral.start}-{ephemeral.stop - 1}")


def _ephemeral_ports() -> range:
    """The ports the kernel hands out itself (Linux's setting; elsewhere IANA's dynamic range)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            low, high = map(int, ports.read().split())
    except (OSError, ValueError):
        low, high = 49152, 65535
    return range(low, high + 1)


def _bindable(port: int) -> bool:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        try:
            sock.bind(("0.0.0.0", port))  # taken on any address (loopback included) fails here
        except OSError:
            return False
        return True


SECRET_MARKERS = ("SECRET", "TOKEN", "PASSWORD", "CREDENTIAL", "PRIVATE")


def job_env(environ: dict[str, str]) -> dict[str, str]:
    """The settings a Ray job may carry in its runtime_env: lorafleet and AWS *settings*, never
    secrets (keys, tokens, passwords), which the workers must already have (a Secret mount, or
    the environment a local cluster inherits)."""
    return {k: v for k, v in environ.items()
            if k.startswith(("AWS_", "LORAFLEET_")) and k != "AWS_ACCESS_KEY_ID"
            and not any(marker in k for marker in SECRET_MARKERS)}
