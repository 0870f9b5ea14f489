"""Usage metering per tenant: requests, images, steps x megapixels, replica-seconds.

Prometheus holds the long-term series (``lorafleet_tenant_*_total``); this ledger answers
``GET /v1/usage?tenant=&since=`` from the gateway's own minute buckets (kept ``retention_s``).
Each gateway replica counts what it served: with several, sum their answers (or use Prometheus).
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass

from pydantic import BaseModel

MINUTE = 60


@dataclass
class UsageTotals:
    requests: int = 0
    images: int = 0
    work: float = 0.0  # images x steps x megapixels
    replica_seconds: float = 0.0


class TenantUsage(BaseModel):
    tenant: str
    since: float
    until: float
    requests: int
    images: int
    steps_megapixels: float
    replica_seconds: float


class UsageLedger:
    def __init__(self, retention_s: float = 7 * 86_400):
        self.retention_s = retention_s
        self.buckets: dict[tuple[str, int], UsageTotals] = {}
        self.lock = threading.Lock()

    def add(self, tenant: str, *, requests: int = 0, images: int = 0, work: float = 0.0,
            replica_seconds: float = 0.0) -> None:
        minute = int(time.time() // MINUTE)
        with self.lock:
            totals = self.buckets.setdefault((tenant, minute), UsageTotals())
            totals.requests += requests
            totals.images += images
            totals.work += work
            totals.replica_seconds += replica_seconds
            if len(self.buckets) % 1000 == 0:
                self._expire(minute)

    def _expire(self, minute: int) -> None:
        oldest = minute - int(self.retention_s // MINUTE)
        for key in [k for k in self.buckets if k[1] < oldest]:
            del self.buckets[key]

    def usage(self, tenant: str | None, since: float) -> list[TenantUsage]:
        first = int(since // MINUTE)
        with self.lock:
            found: dict[str, UsageTotals] = {}
            for (name, minute), totals in self.buckets.items():
                if minute >= first and (tenant is None or name == tenant):
                    into = found.setdefault(name, UsageTotals())
                    for key, value in asdict(totals).items():
                        setattr(into, key, getattr(into, key) + value)
        now = time.time()
        return [TenantUsage(tenant=name, since=since, until=now, requests=t.requests, images=t.images,
                            steps_megapixels=round(t.work, 6), replica_seconds=round(t.replica_seconds, 6))
                for name, t in sorted(found.items())]
