"""Webhook deliveries: signed with HMAC-SHA256, retried with backoff, every attempt recorded.

A delivery is a POST of a JSON body with these headers:

    X-Lorafleet-Event:      training.succeeded (training.<state>)
    X-Lorafleet-Delivery:   a unique id per delivery (the same on its retries)
    X-Lorafleet-Timestamp:  unix seconds when this attempt was signed
    X-Lorafleet-Signature:  v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>

A receiver recomputes the HMAC over the timestamp, a dot and the raw body with its secret,
compares in constant time, and refuses timestamps older than a few minutes (replays):
``verify_signature`` does exactly that. Any 2xx is delivered; anything else is retried. A URL
the outbound policy refuses (outbound.py: checked again before every attempt, since a name can
resolve differently later) is not called: the refusal is recorded and the delivery ends.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from .outbound import OutboundTargets
from .records import Delivery, now

EVENT_HEADER = "X-Lorafleet-Event"
DELIVERY_HEADER = "X-Lorafleet-Delivery"
TIMESTAMP_HEADER = "X-Lorafleet-Timestamp"
SIGNATURE_HEADER = "X-Lorafleet-Signature"
logger = logging.getLogger(__name__)


def signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def verify_signature(secret: str, headers: dict[str, str], body: bytes, tolerance_s: float = 300,
                     at: float | None = None) -> bool:
    """Whether a delivery's headers sign ``body`` with ``secret`` recently enough."""
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        timestamp = int(lowered[TIMESTAMP_HEADER.lower()])
    except (KeyError, ValueError):
        return False
    if abs((at if at is not None else time.time()) - timestamp) > tolerance_s:
        return False
    expected = signature(secret, timestamp, body)
    return hmac.compare_digest(expected, lowered.get(SIGNATURE_HEADER.lower(), ""))


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    first_delay_s: float = 1.0
    max_delay_s: float = 60.0
    timeout_s: float = 10.0

    def delay(self, attempt: int) -> float:
        return min(self.max_delay_s, self.first_delay_s * 2 ** (attempt - 1))


class WebhookSender:
    """Deliveries in background threads; ``record(training_id, delivery)`` logs each attempt."""

    def __init__(self, policy: RetryPolicy, record: Callable[[str, Delivery], None], targets: OutboundTargets,
                 workers: int = 4):
        self.policy = policy
        self.targets = targets
        self.record = record
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lorafleet-webhook")
        self.stopping = threading.Event()

    def send(self, training_id: str, url: str, secret: str, event: str, payload: dict) -> None:
        self.pool.submit(self._deliver, training_id, url, secret, event, payload)

    def _deliver(self, training_id: str, url: str, secret: str, event: str, payload: dict) -> None:
        delivery_id = "dl-" + secrets.token_hex(8)
        body = json.dumps({"event": event, "delivery": delivery_id, **payload}, default=str).encode()
        for attempt in range(1, self.policy.attempts + 1):
            refusal = self.targets.refusal(url)
            outcome = (Delivery(id=delivery_id, event=event, attempt=attempt, at=now(), error=f"refused: {refusal}")
                       if refusal else self._attempt(url, secret, event, delivery_id, body, attempt))
            try:
                self.record(training_id, outcome)
            except Exception:  # the log of a delivery must not stop its retries
                logger.warning("could not record webhook delivery %s", delivery_id, exc_info=True)
            if outcome.delivered or refusal or attempt == self.policy.attempts:
                return
            if self.stopping.wait(self.policy.delay(attempt)):
                return

    def _attempt(self, url: str, secret: str, event: str, delivery_id: str, body: bytes, attempt: int) -> Delivery:
        timestamp = int(time.time())
        headers = {"Content-Type": "application/json", EVENT_HEADER: event, DELIVERY_HEADER: delivery_id,
                   TIMESTAMP_HEADER: str(timestamp), SIGNATURE_HEADER: signature(secret, timestamp, body),
                   "User-Agent": "lorafleet-webhooks/1"}
        try:
            response = httpx.post(url, content=body, headers=headers, timeout=self.policy.timeout_s,
                                  follow_redirects=False)
            return Delivery(id=delivery_id, event=event, attempt=attempt, at=now(), status_code=response.status_code,
                            delivered=200 <= response.status_code < 300)
        except httpx.HTTPError as exc:
            return Delivery(id=delivery_id, event=event, attempt=attempt, at=now(),
                            error=f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        self.stopping.set()
        self.pool.shutdown(wait=False, cancel_futures=True)
