"""Bearer tokens with scopes, compared in constant time.

Scopes: ``generate`` (product backends: generation routes) and ``admin`` (adapter and cache
management; implies ``generate``). Tokens come from settings (``api_tokens``) or a secret file.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

from lorafleet.registry.errors import Forbidden, ServiceUnavailable, Unauthenticated

SCOPES = frozenset({"generate", "admin"})
IMPLIED = {"admin": {"generate"}}


@dataclass(frozen=True)
class TokenEntry:
    token: bytes
    scopes: frozenset[str]


def _entry(token: str, scopes: list[str]) -> TokenEntry:
    unknown = set(scopes) - SCOPES
    if not token or unknown:
        raise ValueError(f"invalid token entry (unknown scopes {sorted(unknown)})" if unknown else "empty token")
    granted = set(scopes)
    for scope in scopes:
        granted |= IMPLIED.get(scope, set())
    return TokenEntry(token.encode(), frozenset(granted))


def parse_token_spec(spec: str) -> list[TokenEntry]:
    """'tok1=generate,tok2=admin+generate' -> entries."""
    entries = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        token, _, scopes = item.partition("=")
        entries.append(_entry(token.strip(), [s for s in scopes.split("+") if s] or ["generate"]))
    return entries


def parse_token_file(path: Path) -> list[TokenEntry]:
    """One 'TOKEN scope,scope' per line; '#' starts a comment."""
    entries = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            token, _, scopes = line.partition(" ")
            entries.append(_entry(token, [s.strip() for s in scopes.split(",") if s.strip()] or ["generate"]))
    return entries


class TokenTable:
    def __init__(self, entries: list[TokenEntry], enabled: bool):
        self.entries = entries
        self.enabled = enabled

    @classmethod
    def from_settings(cls, settings) -> "TokenTable":
        """Tokens from settings or LORAFLEET_API_TOKENS / a secret file; refuses auth without tokens."""
        entries = parse_token_spec(settings.api_tokens) if settings.api_tokens else []
        if settings.tokens_file:
            entries += parse_token_file(settings.tokens_file)
        if settings.auth_enabled and not entries:
            raise ServiceUnavailable("auth_enabled is set but no tokens are configured (api_tokens, "
                                     "LORAFLEET_API_TOKENS or tokens_file)", field="api_tokens")
        return cls(entries, settings.auth_enabled)

    def _scopes_of(self, presented: bytes) -> frozenset[str] | None:
        found = None
        for entry in self.entries:  # compare with every token, in constant time each
            if hmac.compare_digest(entry.token, presented):
                found = entry.scopes
        return found

    def authorize(self, authorization: str | None, scope: str) -> None:
        """Raise Unauthenticated (401) or Forbidden (403) unless the header grants ``scope``."""
        if not self.enabled:
            return
        scheme, _, credentials = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise Unauthenticated("missing bearer token", field="authorization")
        scopes = self._scopes_of(credentials.strip().encode())
        if scopes is None:
            raise Unauthenticated("invalid token", field="authorization")
        if scope not in scopes:
            raise Forbidden(f"this token lacks the '{scope}' scope", field="authorization")
