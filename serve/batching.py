"""Continuous batching for one replica: concurrent requests share pipeline passes, oldest first.

One worker thread owns the pipeline (every torch call of a replica runs on it: OpenMP keeps a
thread team per calling thread, and idle teams spinning on a small CPU starve the busy one).
It takes the oldest waiting request, adds the waiting requests that share its batch key, in
arrival order, up to ``max_batch_images`` images, and runs them as one pass. Requests that
arrive during a pass form the next one. A request reaching an idle replica starts at once
(measured: a window for everyone was 5.5 ms of a 200 ms idle request on `tiny` through HTTP).
Right after a pass (within ``wait_ms`` of its end) the next one of the same key waits, up to
``wait_ms``, for as many images as that pass held plus those of its key already waiting then
(the batch's cap at most): callers answered by a pass tend to come back a round trip later
(HTTP, the gateway, Ray), and a pass that started without them left them a pass of their own.
Measured through HTTP on `small` with 8 closed-loop clients and a 5 ms window that did not wait
for them: passes settled into 1 image, then 7, for good. A fixed 50 ms window, shorter than the
round trip of `tiny`'s callers under load with adapters, cost every pass the whole window and still
left them behind (docs/benchmarks.md). The round trip grows with the pass (both share the CPU, and
the callers' answers leave when it ends), so the window is the longer of ``wait_ms`` and
``wait_pass_share`` of the pass that just ended, counted from its end: 50 ms after a 250 ms pass.
On `tiny` through HTTP (callers back 35-70 ms after a pass) that turned passes of 1 and 7 images
into passes of 8, and 13-16 images/s into 22-23. A caller that sends one request at a
time never waits (its pass held one image, and its next request is that one), nor does a tenant
that waited out another's pass (that tenant's callers would not share its pass).

Fairness: the oldest request is always in the next pass, whatever its adapter, so a request
waits for at most as many passes as there are requests ahead of it: a hot adapter cannot
starve a cold one (the mixed mode lets them share a pass anyway; the bound holds when keys
differ).

Between tenants (``lane``): a request of a lane with nothing in the pass under way need not wait
for that pass to end. At a boundary between two of its denoising steps, the waiting requests of
such lanes (those sharing the oldest one's key, together costing less than that pass: a short
pass cuts into a long one, never the reverse) run as a pass of their own, if the host (the
engine) can run them there and leave the pass as it was; otherwise they wait for the pass to
end and the next pass is theirs, without the lanes of the pass they waited out. A pass
keeps at least half the replica's time while it runs: nothing cuts in while the passes that cut
in so far took longer than the pass's own steps, so it at most about doubles. Measured (`lorafleet
bench multiteam`): a quiet tenant's request under another's flood waits about a denoising step
or two instead of the rest of a pass.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

R = TypeVar("R")  # a request
T = TypeVar("T")  # its result


@dataclass
class _Waiting(Generic[R, T]):
    key: Hashable
    request: R
    images: int
    lane: str = ""
    cost: float = 1.0  # the work it adds to a pass (images x steps x pixels, or anything proportional)
    future: Future = field(default_factory=Future)


class BetweenSteps(Protocol[R, T]):
    """What runs passes between two steps of another (serve/engine.py)."""

    def can_run_between_steps(self, requests: list[R]) -> bool: ...

    def run_between_steps(self, requests: list[R]) -> list[T]: ...


class BatchScheduler(Generic[R, T]):
    """``run_batch(requests, between_steps)`` runs one pass and calls ``between_steps()`` between
    two of its steps; ``host`` (None: no cutting in) runs passes there."""

    def __init__(self, run_batch: Callable[[list[R], Callable[[], None] | None], list[T]],
                 max_batch_images: int = 8, wait_ms: float = 0.0, name: str = "lorafleet-pipeline",
                 host: Callable[[], BetweenSteps[R, T]] | None = None, wait_pass_share: float = 0.0):
        self.run_batch = run_batch
        self.max_batch_images = max_batch_images
        self.wait_s = wait_ms / 1000
        self.wait_pass_share = wait_pass_share
        self._last_pass_s = 0.0  # how long the last pass took
        self.host = host
        self._queue: list[_Waiting[R, T]] = []
        self._pass_lanes: set[str] = set()  # lanes in the pass under way
        self._pass_cost = 0.0  # the pass under way's
        self._pass_started = 0.0  # monotonic seconds
        self._cut_in_s = 0.0  # time the passes that cut into it took
        self._refused: set[int] = set()  # ids of requests the host could not run in it
        self._ready = threading.Condition()
        self._closed = False
        self._last_pass_end = float("-inf")  # monotonic seconds
        self._expected: tuple[Hashable, int] = (None, 0)  # the next pass of this key waits for so many images
        self.passes = 0
        self.cut_ins = 0  # passes run between two steps of another
        self._worker = threading.Thread(target=self._serve, name=name, daemon=True)
        self._worker.start()

    def submit(self, key: Hashable, request: R, images: int = 1, lane: str = "", cost: float | None = None) -> Future:
        """Queue ``request`` (of tenant ``lane``; "" cuts into nothing; ``cost``: its work, by
        default its images); the future resolves to its result (or raises its error)."""
        item: _Waiting[R, T] = _Waiting(key, request, images, lane, float(images if cost is None else cost))
        with self._ready:
            if self._closed:
                raise RuntimeError("the batch scheduler is closed")
            self._queue.append(item)
            self._ready.notify()
        return item.future

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the pipeline thread between passes (warm-up, leaving the fused state...)."""
        return self.submit(("call", id(fn)), _Call(fn)).result()

    @property
    def waiting(self) -> int:
        with self._ready:
            return len(self._queue)

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def _next_batch(self) -> list[_Waiting[R, T]] | None:
        with self._ready:
            while not self._queue and not self._closed:
                self._ready.wait()
            if not self._queue:
                return None
            window = self._window_s()
            busy = time.monotonic() - self._last_pass_end < window
            if busy and not isinstance(self._queue[0].request, _Call) and not self._waited_out(self._queue[0]):
                deadline = self._last_pass_end + window
                key, expected = self._expected
                while (self._queue[0].key == key and self._fill(key) < expected
                       and time.monotonic() < deadline):
                    self._ready.wait(timeout=max(0.0, deadline - time.monotonic()))
            return self._take()

    def _window_s(self) -> float:
        """How long after a pass its callers are waited for: ``wait_ms``, or the share of that
        pass's own time if longer (a caller left behind waits a whole pass)."""
        return max(self.wait_s, self.wait_pass_share * self._last_pass_s)

    def _waited_out(self, item: _Waiting[R, T]) -> bool:
        """Whether ``item``'s lane waited out the last pass (it had none of its requests)."""
        return bool(item.lane) and item.lane not in self._pass_lanes

    def _fill(self, key: Hashable) -> int:
        return sum(item.images for item in self._queue if item.key == key)

    def _take(self) -> list[_Waiting[R, T]]:
        head = self._queue[0]
        # A lane that waited out another's pass gets a pass without that lane's requests.
        behind = self._pass_lanes if self._waited_out(head) else set()
        batch, images = [], 0
        for item in list(self._queue):
            if item.key != head.key or isinstance(item.request, _Call) or item.lane in behind:
                if item is head:
                    batch.append(item)
                    break
                continue
            if batch and images + item.images > self.max_batch_images:
                break
            batch.append(item)
            images += item.images
        for item in batch:
            self._queue.remove(item)
        return batch

    def _serve(self) -> None:
        while (batch := self._next_batch()) is not None:
            self.passes += 1
            live = [item for item in batch if item.future.set_running_or_notify_cancel()]
            if not live:
                continue
            if isinstance(live[0].request, _Call):
                self._settle(live, lambda fn=live[0].request.fn: [fn()])
            else:
                with self._ready:
                    self._pass_lanes, self._refused = {item.lane for item in live}, set()
                    self._pass_cost = sum(item.cost for item in live)
                    self._pass_started, self._cut_in_s = time.monotonic(), 0.0
                between = self._between_steps if self.host is not None else None
                self._settle(live, functools.partial(self.run_batch, [item.request for item in live], between))
                self._last_pass_s = time.monotonic() - self._pass_started
            with self._ready:
                answered = sum(item.images for item in live)
                self._expected = (live[0].key, min(self.max_batch_images, answered + self._fill(live[0].key)))
            self._last_pass_end = time.monotonic()

    def _settle(self, live: list[_Waiting[R, T]], run: Callable[[], list[T]]) -> None:
        """Run a pass and hand each of its callers its result, or the pass's error."""
        try:
            results = run()
        except BaseException as exc:  # every caller of the pass hears about it
            for item in live:
                item.future.set_exception(exc)
            return
        for item, result in zip(live, results):
            item.future.set_result(result)

    def _between_steps(self) -> None:
        """Called by the pass under way between two of its steps: requests of lanes with nothing
        in it run now, as a pass of their own, if the host can run them there and the pass under
        way has had at least as much time as those that cut into it."""
        if self._cut_in_s > time.monotonic() - self._pass_started - self._cut_in_s:
            return
        host = self.host()
        batch, refused = [], []
        for item in self._cutting_in():
            (batch if host.can_run_between_steps([item.request]) else refused).append(item)
        with self._ready:  # only this thread takes requests off the queue: they are all still in it
            self._refused.update(id(item) for item in refused)
            for item in batch:
                self._queue.remove(item)
        live = [item for item in batch if item.future.set_running_or_notify_cancel()]
        if live:
            self.passes += 1
            self.cut_ins += 1
            started = time.monotonic()
            self._settle(live, functools.partial(host.run_between_steps, [item.request for item in live]))
            self._cut_in_s += time.monotonic() - started

    def _cutting_in(self) -> list[_Waiting[R, T]]:
        """The oldest waiting request of a lane with nothing in the pass under way, and those
        that can share its pass, up to ``max_batch_images`` and while they cost less than the
        pass under way (a busy tenant's requests do not cut into a quiet one's single image)."""
        with self._ready:
            candidates = [item for item in self._queue
                          if item.lane and item.lane not in self._pass_lanes and id(item) not in self._refused
                          and not isinstance(item.request, _Call) and item.cost < self._pass_cost]
            batch, images, cost = [], 0, 0.0
            for item in candidates:
                fits = images + item.images <= self.max_batch_images and cost + item.cost < self._pass_cost
                if item.key == candidates[0].key and fits:
                    batch.append(item)
                    images, cost = images + item.images, cost + item.cost
            return batch


@dataclass(frozen=True)
class _Call:
    fn: Callable
