"""Where the server may send requests that callers choose: webhooks and MLflow tracking servers.

A caller who names a URL for the server to call could otherwise make it reach what only the
server can reach (its cloud metadata endpoint, Ray's dashboard, a database on the pod network).
So by default a target must resolve to public addresses only; an operator allows internal
receivers by host name or network (``webhooks.allowed_hosts``), or every address
(``webhooks.allow_private``). A target is checked when it is submitted (a 422 naming the field)
and again before every delivery, since a name can resolve differently later.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import OutboundTargetRefused

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (empty when it does not)."""
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)})
    except (socket.gaierror, UnicodeError):
        return []


class OutboundTargets(BaseModel):
    """`webhooks:` in the serve settings: which hosts webhooks and MLflow tracking may reach."""

    model_config = ConfigDict(extra="forbid")

    allow_private: bool = Field(False, description="Allow every address, private, loopback and link-local "
                                "included (a closed network where callers are trusted).")
    allowed_hosts: list[str] = Field(default_factory=list, description="Host names (hooks.internal) or networks "
                                     "(10.20.0.0/16, 127.0.0.1/32) allowed although not public.")

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts_or_networks(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            if "/" in host:
                ipaddress.ip_network(host, strict=False)  # a ValueError names the bad network
            elif not host or any(c in host for c in " :@?#"):
                raise ValueError(f"{host!r} is neither a host name nor a network")
        return [host.lower() for host in hosts]

    def _allowed_network(self, address: Address) -> bool:
        return any(address in ipaddress.ip_network(host, strict=False) for host in self.allowed_hosts if "/" in host)

    def refusal(self, url: str, resolver: Resolver = resolve) -> str | None:
        """Why the server may not call ``url``; None when it may."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return f"{url!r} is not an http(s) URL with a host"
        host = parts.hostname.lower()
        if self.allow_private or host in self.allowed_hosts:
            return None
        port = parts.port or (443 if parts.scheme == "https" else 80)
        found = resolver(host, port)
        if not found:
            return f"{host!r} does not resolve"
        for text in found:
            address = ipaddress.ip_address(text.split("%")[0])
            public = address.ipv4_mapped.is_global if getattr(address, "ipv4_mapped", None) else address.is_global
            if not public and not self._allowed_network(address):
                return (f"{host!r} resolves to {address}, which is not a public address; an operator can allow it "
                        "in webhooks.allowed_hosts")
        return None

    def check(self, url: str, field: str, resolver: Resolver = resolve) -> None:
        """Refuse ``url`` (422 naming ``field``) when the server may not call it."""
        reason = self.refusal(url, resolver)
        if reason is not None:
            raise OutboundTargetRefused(reason, field=field)
