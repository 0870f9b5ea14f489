"""Usage metering per tenant: requests, images, steps x megapixels, replica-seconds.

Prometheus holds the long-term series (``lorafleet_tenant_*_total``); this ledger answers
``GET /v1/usage?tenant=&since=`` from minute buckets. Each gateway counts what it served in
memory and flushes its buckets to the registry's storage every ``usage.flush_s``, one object per
hour and gateway (``usage/<hour>/<gateway>.json``, written by that gateway only). An answer sums
every gateway's stored hours with this gateway's own memory, so a restarted gateway, or any of
several, answers for all of them; at most the last ``flush_s`` of a gateway that died unflushed is
lost. Hours past ``retention_s`` are deleted by whichever gateway flushes.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import astuple, dataclass

from pydantic import BaseModel, ConfigDict, Field

from lorafleet.errors import LorafleetError
from lorafleet.registry.storage import ObjectStore

MINUTE, HOUR = 60, 3600
PREFIX = "usage/"
logger = logging.getLogger(__name__)


class UsageSettings(BaseModel):
    """`usage:` in the serve settings."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    retention_s: float = Field(7 * 86_400, ge=HOUR, description="How long per-minute usage is kept.")
    flush_s: float = Field(10.0, gt=0, le=600, description="How often a gateway writes its usage to the "
                           "registry's storage (what a gateway that dies unflushed loses).")


@dataclass
class UsageTotals:
    requests: int = 0
    images: int = 0
    work: float = 0.0  # images x steps x megapixels
    replica_seconds: float = 0.0

    def add(self, other: "UsageTotals") -> None:
        self.requests += other.requests
        self.images += other.images
        self.work += other.work
        self.replica_seconds += other.replica_seconds


class TenantUsage(BaseModel):
    tenant: str
    since: float
    until: float
    requests: int
    images: int
    steps_megapixels: float
    replica_seconds: float


Buckets = dict[tuple[str, int], UsageTotals]  # (tenant, minute) -> totals


class UsageLedger:
    def __init__(self, store: ObjectStore | None = None, retention_s: float = 7 * 86_400, flush_s: float = 10.0):
        self.store = store
        self.retention_s = retention_s
        self.owner = "gw-" + secrets.token_hex(8)
        self.buckets: Buckets = {}
        self.lock = threading.Lock()
        self._dirty: set[int] = set()  # hours changed since they were last written
        self._expired_below: int | None = None  # the oldest kept hour at the last expiry (none yet)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if store is not None and flush_s > 0:
            self._thread = threading.Thread(target=self._flush_every, args=(flush_s,), name="lorafleet-usage",
                                            daemon=True)
            self._thread.start()

    def add(self, tenant: str, *, requests: int = 0, images: int = 0, work: float = 0.0,
            replica_seconds: float = 0.0, at: float | None = None) -> None:
        minute = int((time.time() if at is None else at) // MINUTE)
        with self.lock:
            self.buckets.setdefault((tenant, minute), UsageTotals()).add(
                UsageTotals(requests, images, work, replica_seconds))
            self._dirty.add(minute * MINUTE // HOUR)
            if self.store is None and len(self.buckets) % 1000 == 0:
                self._forget_before(self._oldest_minute())

    # ------------------------------------------------------------------ answers
    def usage(self, tenant: str | None, since: float) -> list[TenantUsage]:
        first = int(since // MINUTE)
        with self.lock:
            own = dict(self.buckets)
        found: dict[str, UsageTotals] = {}
        for (name, minute), totals in [*own.items(), *self._stored(first // (HOUR // MINUTE))]:
            if minute >= first and (tenant is None or name == tenant):
                found.setdefault(name, UsageTotals()).add(totals)
        now = time.time()
        return [TenantUsage(tenant=name, since=since, until=now, requests=t.requests, images=t.images,
                            steps_megapixels=round(t.work, 6), replica_seconds=round(t.replica_seconds, 6))
                for name, t in sorted(found.items())]

    def _stored(self, first_hour: int) -> Iterable[tuple[tuple[str, int], UsageTotals]]:
        """Every other gateway's buckets (and this one's from before its memory) from ``first_hour``."""
        if self.store is None:
            return
        with self.lock:
            in_memory = {minute * MINUTE // HOUR for _, minute in self.buckets}
        for info in list(self.store.list(PREFIX)):
            hour, owner = _parse_key(info.key)
            if hour is None or hour < first_hour or (owner == self.owner and hour in in_memory):
                continue
            stored = self.store.read(info.key)
            yield from _decode(info.key, stored.data) if stored is not None else ()

    # ------------------------------------------------------------------ flushing
    def flush(self) -> None:
        """Write this gateway's changed hours; a failure is logged and retried at the next flush."""
        if self.store is None:
            return
        with self.lock:
            hours, self._dirty = self._dirty, set()
            snapshot = {hour: _encode({k: v for k, v in self.buckets.items() if k[1] * MINUTE // HOUR == hour})
                        for hour in hours}
        for hour, data in sorted(snapshot.items()):
            try:
                self._write(hour, data)
            except (LorafleetError, OSError) as exc:
                logger.warning("usage for hour %s not written (retried at the next flush): %s", hour, exc)
                with self.lock:
                    self._dirty.add(hour)
        self._expire()

    def _write(self, hour: int, data: bytes) -> None:
        key = f"{PREFIX}{hour:010d}/{self.owner}.json"
        current = self.store.read(key)  # this gateway's own object: no other writer races it
        self.store.compare_and_swap(key, data, current.token if current else None)
        with self.lock:  # hours before the current one are complete once stored: answered from the store
            current_hour = int(time.time() // HOUR)
            if hour < current_hour and hour not in self._dirty:
                self.buckets = {k: v for k, v in self.buckets.items() if k[1] * MINUTE // HOUR != hour}

    def _expire(self) -> None:
        """Delete every gateway's hours past retention: on the first flush, then whenever the
        oldest kept hour moves on (an idle gateway does not list the store every flush)."""
        oldest_hour = self._oldest_minute() * MINUTE // HOUR
        if oldest_hour == self._expired_below:
            return
        try:
            for info in list(self.store.list(PREFIX)):
                hour, _ = _parse_key(info.key)
                if hour is not None and hour < oldest_hour:
                    self.store.delete(info.key)
            self._expired_below = oldest_hour
        except (LorafleetError, OSError) as exc:
            logger.warning("expiring old usage failed (retried at the next flush): %s", exc)
        with self.lock:
            self._forget_before(self._oldest_minute())

    def _oldest_minute(self) -> int:
        return int((time.time() - self.retention_s) // MINUTE)

    def _forget_before(self, minute: int) -> None:
        for key in [k for k in self.buckets if k[1] < minute]:
            del self.buckets[key]

    def _flush_every(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.flush()

    def close(self) -> None:
        """Stop the flushing thread and write what is left."""
        self._stop.set()
        self.flush()


def _parse_key(key: str) -> tuple[int | None, str]:
    parts = key[len(PREFIX):].split("/")
    if len(parts) != 2 or not parts[0].isdigit() or not parts[1].endswith(".json"):
        return None, ""
    return int(parts[0]), parts[1][:-len(".json")]


def _encode(buckets: Buckets) -> bytes:
    tree: dict[str, dict[str, list]] = {}
    for (tenant, minute), totals in buckets.items():
        tree.setdefault(tenant, {})[str(minute)] = list(astuple(totals))
    return json.dumps({"buckets": tree}, sort_keys=True).encode()


def _decode(key: str, data: bytes) -> list[tuple[tuple[str, int], UsageTotals]]:
    """A stored hour's buckets; a damaged object is skipped (logged), never fails an answer."""
    try:
        tree = json.loads(data)["buckets"]
        return [((str(tenant), int(minute)), UsageTotals(int(r), int(i), float(w), float(s)))
                for tenant, minutes in tree.items() for minute, (r, i, w, s) in minutes.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        logger.warning("skipping damaged usage object %s: %s", key, exc)
        return []
