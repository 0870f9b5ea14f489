"""Tenants: who a caller is, what they may see, how fast they may ask, and their share of the queue.

A token belongs to a tenant (``token=generate+train@acme`` in api_tokens, or a third column in
the tokens file). A tenant owns adapter *namespaces*: name prefixes such as ``acme-``. Prefixes,
not an ACL stored with the registry: an adapter's name is its immutable identity, so whether a
tenant may use it follows from the name alone, with no extra registry read on the request path and
no second store to keep consistent across gateways; publishing under another tenant's prefix is
impossible for that tenant's tokens. A token without a tenant (operators) sees everything.

Everything a tenant cannot see answers 404, exactly as if it did not exist.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from lorafleet.errors import ErrorKind, LorafleetError

TENANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,31}$"


class RateLimited(LorafleetError):
    """A tenant is over its request or work rate: retry after ``retry_after_s``."""

    code = "rate_limited"
    kind = ErrorKind.rate_limited

    def __init__(self, message: str, retry_after_s: float, field: str | None = None):
        super().__init__(message, field=field)
        self.retry_after_s = retry_after_s


class TenantSettings(BaseModel):
    """One tenant (``tenants.<name>`` in the serve settings)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    namespaces: list[str] = Field(min_length=1, description="Adapter name prefixes this tenant owns, e.g. "
                                  "['acme-']: it sees, generates with, moves aliases of and trains only these.")
    requests_per_s: float | None = Field(None, gt=0, description="Sustained requests per second (token bucket).")
    request_burst: int = Field(20, ge=1, description="Requests allowed at once above the sustained rate.")
    work_per_s: float | None = Field(None, gt=0, description="Sustained work per second in images x steps x "
                                     "megapixels (a 512 px image at 20 steps is 5.2).")
    work_burst: float = Field(200.0, gt=0, description="Work allowed at once above the sustained rate.")
    share: float = Field(1.0, gt=0, le=1000, description="Weight of this tenant in the replicas' queue.")
    max_queued: int = Field(64, ge=1, description="Requests of this tenant waiting at the gateway before 429.")


@dataclass(frozen=True)
class Caller:
    """Who is calling: a tenant and its namespaces, or an operator (tenant None) who sees everything."""

    tenant: str | None = None
    namespaces: tuple[str, ...] = ()

    def sees(self, name: str) -> bool:
        return self.tenant is None or any(name.startswith(prefix) for prefix in self.namespaces)

    @property
    def label(self) -> str:
        return self.tenant or "-"


OPERATOR = Caller()


class TokenBucket:
    """``rate`` per second, up to ``burst`` at once; thread-safe."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = rate, burst
        self.level, self.at = burst, time.monotonic()
        self.lock = threading.Lock()

    def take(self, amount: float) -> float:
        """0 if ``amount`` was taken, else the seconds until it could be."""
        with self.lock:
            now = time.monotonic()
            self.level = min(self.burst, self.level + (now - self.at) * self.rate)
            self.at = now
            if amount <= self.level or (amount > self.burst and self.level >= self.burst):
                self.level -= amount  # one request above the burst runs when the bucket is full
                return 0.0
            return (min(amount, self.burst) - self.level) / self.rate


@dataclass
class TenantLimits:
    requests: TokenBucket | None
    work: TokenBucket | None

    def admit(self, work: float) -> None:
        """Take one request and ``work`` from the buckets, or raise RateLimited (nothing taken)."""
        if self.requests is not None:
            wait = self.requests.take(1)
            if wait:
                raise RateLimited(f"over this tenant's {self.requests.rate:g} requests/s", wait)
        if self.work is not None:
            wait = self.work.take(work)
            if wait:
                if self.requests is not None:
                    self.requests.take(-1)  # give the request back
                raise RateLimited(f"over this tenant's {self.work.rate:g} image-steps-megapixels/s", wait)


def request_work(num_images: int, steps: int, width: int, height: int) -> float:
    """images x steps x megapixels: what one request costs the replicas."""
    return num_images * steps * width * height / 1e6


class Tenants:
    """The configured tenants: their namespaces, rate limits and queue shares."""

    def __init__(self, tenants: dict[str, TenantSettings]):
        self.settings = tenants
        self.limits = {name: TenantLimits(
            TokenBucket(t.requests_per_s, t.request_burst) if t.requests_per_s else None,
            TokenBucket(t.work_per_s, t.work_burst) if t.work_per_s else None) for name, t in tenants.items()}

    @property
    def enabled(self) -> bool:
        return bool(self.settings)

    def caller(self, tenant: str | None) -> Caller:
        if tenant is None:
            return OPERATOR
        return Caller(tenant, tuple(self.settings[tenant].namespaces))

    def admit(self, caller: Caller, work: float) -> None:
        if caller.tenant is not None:
            self.limits[caller.tenant].admit(work)

    def share(self, caller: Caller) -> float:
        return self.settings[caller.tenant].share if caller.tenant in self.settings else 1.0

    def max_queued(self, caller: Caller) -> int | None:
        return self.settings[caller.tenant].max_queued if caller.tenant in self.settings else None


@dataclass
class _Lane:
    share: float
    in_flight: int = 0
    served: float = 0.0  # virtual time: requests served / share
    waiting: deque = field(default_factory=deque)


class FairAdmission:
    """At most ``capacity`` requests with the replicas at once; the rest wait in one lane per
    tenant, and a freed place goes to the waiting lane that has been served least for its share
    (weighted fair queuing). One tenant's burst therefore delays another's request by at most
    the requests already with the replicas: about one pass.

    A lane with nothing in flight or waiting goes at once, over ``capacity`` if need be, within
    ``cut_in`` more places (the replicas hold that many more): at the replica its request runs
    between two steps of the pass under way (serve/batching.py) rather than after it."""

    def __init__(self, capacity: int, cut_in: int = 0):
        self.capacity = capacity
        self.cut_in = cut_in
        self.in_flight = 0
        self.lanes: dict[str, _Lane] = {}

    def _lane(self, key: str, share: float) -> _Lane:
        lane = self.lanes.get(key)
        if lane is None:
            floor = min((other.served for other in self.lanes.values() if other.waiting or other.in_flight),
                        default=0.0)
            lane = self.lanes[key] = _Lane(share, served=floor)  # a newcomer starts level, not ahead
        return lane

    async def acquire(self, key: str, share: float, max_queued: int | None) -> None:
        lane = self._lane(key, share)
        if self.in_flight < self.capacity and not any(other.waiting for other in self.lanes.values()):
            self._grant(lane)
            return
        if not lane.in_flight and not lane.waiting and self.in_flight < self.capacity + self.cut_in:
            self._grant(lane)  # its first request: it cuts into the pass under way
            return
        if max_queued is not None and len(lane.waiting) >= max_queued:
            raise RateLimited(f"{len(lane.waiting)} requests of this tenant are already waiting", 1.0)
        ticket = asyncio.get_running_loop().create_future()
        lane.waiting.append(ticket)
        try:
            await ticket
        except asyncio.CancelledError:
            if ticket.done() and not ticket.cancelled():
                self.release(key)  # granted as the caller left: pass the place on
            else:
                lane.waiting.remove(ticket)
            raise

    def _grant(self, lane: _Lane) -> None:
        lane.in_flight += 1
        lane.served += 1 / lane.share
        self.in_flight += 1

    def release(self, key: str) -> None:
        lane = self.lanes[key]
        lane.in_flight -= 1
        self.in_flight -= 1
        while self.in_flight < self.capacity:
            waiting = [other for other in self.lanes.values() if other.waiting]
            if not waiting:
                break
            chosen = min(waiting, key=lambda other: (other.served, other.in_flight))
            ticket = chosen.waiting.popleft()
            if not ticket.cancelled():
                self._grant(chosen)
                ticket.set_result(None)
        if not lane.in_flight and not lane.waiting:
            del self.lanes[key]  # idle: it comes back level with the others, not ahead
