"""Bearer tokens with scopes, compared in constant time.

Scopes: ``generate`` (product backends: generation routes, adapter listing, the API schema),
``train`` (datasets and trainings), ``metrics`` (the Prometheus scraper) and ``admin`` (alias
moves, replica identity; implies the others). Tokens come from settings (``api_tokens``) or a
secret file; auth is on whenever tokens exist, and a token shorter than 32 characters or still
holding a ``REPLACE_ME`` placeholder is refused at start-up.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

from .errors import Forbidden, ServiceUnavailable, Unauthenticated

SCOPES = frozenset({"generate", "train", "metrics", "admin"})
IMPLIED = {"admin": {"generate", "train", "metrics"}}
MIN_TOKEN_CHARS = 32
PLACEHOLDER = "REPLACE_ME"


@dataclass(frozen=True)
class TokenEntry:
    token: bytes
    scopes: frozenset[str]
    tenant: str | None = None  # None: an operator's token (every namespace)


@dataclass(frozen=True)
class Identity:
    scopes: frozenset[str]
    tenant: str | None


ANONYMOUS = Identity(frozenset(), None)


def _entry(token: str, scopes: list[str], tenant: str | None = None) -> TokenEntry:
    unknown = set(scopes) - SCOPES
    if unknown:
        raise ValueError(f"api_tokens: unknown scopes {sorted(unknown)} (known: {sorted(SCOPES)})")
    if PLACEHOLDER in token:
        raise ValueError(f"api_tokens: a token still holds the {PLACEHOLDER} placeholder; generate real ones "
                         "(e.g. `openssl rand -hex 32`)")
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"api_tokens: a token of {len(token)} characters is too short; use at least "
                         f"{MIN_TOKEN_CHARS} (e.g. `openssl rand -hex 32`)")
    granted = set(scopes)
    for scope in scopes:
        granted |= IMPLIED.get(scope, set())
    return TokenEntry(token.encode(), frozenset(granted), tenant or None)


def parse_token_spec(spec: str) -> list[TokenEntry]:
    """'tok1=generate,tok2=admin+generate,tok3=generate+train@acme' -> entries (@tenant optional)."""
    entries = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        token, _, granted = item.partition("=")
        scopes, _, tenant = granted.partition("@")
        entries.append(_entry(token.strip(), [s for s in scopes.split("+") if s] or ["generate"], tenant.strip()))
    return entries


def parse_token_file(path: Path) -> list[TokenEntry]:
    """One 'TOKEN scope,scope [TENANT]' per line; '#' starts a comment."""
    entries = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            token, scopes, tenant = (line.split(None, 2) + ["", ""])[:3]
            entries.append(_entry(token, [s.strip() for s in scopes.split(",") if s.strip()] or ["generate"],
                                  tenant.strip()))
    return entries


def configured_tokens(settings) -> list[TokenEntry]:
    """Every token the settings configure (ValueError naming the problem for a bad one)."""
    entries = parse_token_spec(settings.api_tokens) if settings.api_tokens else []
    if settings.tokens_file:
        try:
            entries += parse_token_file(settings.tokens_file)
        except OSError as exc:
            raise ValueError(f"tokens_file: cannot read {settings.tokens_file}: {exc.strerror}") from exc
    return entries


class TokenTable:
    def __init__(self, entries: list[TokenEntry], enabled: bool):
        self.entries = entries
        self.enabled = enabled

    @classmethod
    def from_settings(cls, settings) -> "TokenTable":
        """Tokens from settings or LORAFLEET_API_TOKENS / a secret file; refuses auth without tokens."""
        try:
            entries = configured_tokens(settings)
        except ValueError as exc:
            raise ServiceUnavailable(str(exc), field="api_tokens") from exc
        if settings.auth_required and not entries:
            raise ServiceUnavailable("auth_enabled is set but no tokens are configured (api_tokens, "
                                     "LORAFLEET_API_TOKENS or tokens_file)", field="api_tokens")
        return cls(entries, settings.auth_required)

    def scopes_of(self, authorization: str | None) -> frozenset[str]:
        """The scopes an Authorization header grants (all of them when auth is off; none if invalid)."""
        return self.identify(authorization).scopes

    def identify(self, authorization: str | None) -> Identity:
        """Scopes and tenant of an Authorization header (every scope, no tenant, when auth is off)."""
        if not self.enabled:
            return Identity(SCOPES, None)
        scheme, _, credentials = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            return ANONYMOUS
        entry = self._entry_of(credentials.strip().encode())
        return Identity(entry.scopes, entry.tenant) if entry else ANONYMOUS

    def _scopes_of(self, presented: bytes) -> frozenset[str] | None:
        entry = self._entry_of(presented)
        return entry.scopes if entry else None

    def _entry_of(self, presented: bytes) -> TokenEntry | None:
        found = None
        for entry in self.entries:  # compare with every token, in constant time each
            if hmac.compare_digest(entry.token, presented):
                found = entry
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
