"""A tenant's request runs between two denoising steps of another tenant's pass (serve/batching.py,
serve/engine.py): the scheduler lets other lanes' shorter passes cut in while the pass keeps half
the time, only where the engine can host them, and both passes give exactly the images they give
alone."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from serve_setup import GUIDANCE, PROMPT, STEPS

from lorafleet.accelerator import resolve_placement
from lorafleet.bases import load_base
from lorafleet.serve.batching import BatchScheduler
from lorafleet.serve.engine import PipelineEngine
from lorafleet.serve.jobs import AdapterUse, BatchRequest, GenerationJob
from lorafleet.serve.tenants import FairAdmission

# ---------------------------------------------------------------------------- the scheduler


class _Host:
    """Runs cut-in passes as the engine would, refusing requests named "refuse"."""

    def __init__(self, log: list):
        self.log = log
        self.asked = 0

    def can_run_between_steps(self, requests):
        self.asked += 1
        return "refuse" not in requests

    def run_between_steps(self, requests):
        self.log.append(("cut in", list(requests)))
        return [f"{r}:cut" for r in requests]


class _HeldPass:
    """A scheduler whose pass of ``first`` is held at its start until ``go`` is set; every pass
    then has one step boundary."""

    def __init__(self, host: _Host, first: str, max_batch_images: int):
        self.log, self.started, self.go = host.log, threading.Event(), threading.Event()

        def run_batch(requests, between_steps):
            self.log.append(("pass", list(requests)))
            if requests == [first]:
                self.started.set()
                assert self.go.wait(30)
            between_steps()
            return [f"{r}:pass" for r in requests]

        self.scheduler = BatchScheduler(run_batch, max_batch_images=max_batch_images, host=lambda: host)


def test_other_lanes_cut_in_once_per_pass_and_refused_requests_wait_their_turn():
    log: list = []
    host = _Host(log)
    arrivals = threading.Event()
    in_step = threading.Event()

    def run_batch(requests, between_steps):
        log.append(("pass", list(requests)))
        for step in range(4):
            if step == 1 and requests == ["a1", "a2"]:
                in_step.set()
                assert arrivals.wait(30)
            if step:
                between_steps()
        return [f"{r}:pass" for r in requests]

    scheduler = BatchScheduler(run_batch, max_batch_images=4, host=lambda: host)
    try:
        first = [scheduler.submit("k", name, images=2, lane="a") for name in ("a1", "a2")]
        assert in_step.wait(30)
        b1 = scheduler.submit("k", "b1", lane="b")
        a3 = scheduler.submit("k", "a3", lane="a")  # its lane is in the pass: it waits
        c1 = scheduler.submit("k", "c1", lane="c")
        d = scheduler.submit("k", "refuse", lane="d")  # the host cannot run it there
        arrivals.set()
        assert [f.result(30) for f in first] == ["a1:pass", "a2:pass"]
        assert b1.result(30) == "b1:cut" and c1.result(30) == "c1:cut"
        assert a3.result(30) == "a3:pass" and d.result(30) == "refuse:pass"
    finally:
        scheduler.close()
    # b and c share one pass at the first step boundary; d, refused there, is not asked again
    assert log[:3] == [("pass", ["a1", "a2"]), ("cut in", ["b1", "c1"]), ("pass", ["a3", "refuse"])]
    assert scheduler.cut_ins == 1 and host.asked == 3  # b1, c1 and the refused one, each once


def test_a_pass_keeps_at_least_half_the_time_while_others_cut_in():
    log: list = []

    class Slow(_Host):
        def run_between_steps(self, requests):
            time.sleep(0.3)
            return super().run_between_steps(requests)

    host = Slow(log)

    def run_batch(requests, between_steps):
        log.append(("pass", list(requests)))
        for boundary in range(4):
            between_steps()
            if boundary == 1:
                time.sleep(0.5)  # a step of the pass's own, longer than one cut-in
        return [f"{r}:pass" for r in requests]

    scheduler = BatchScheduler(run_batch, max_batch_images=4, host=lambda: host)
    try:
        a1 = scheduler.submit("ka", "a1", images=2, lane="a")
        quiet = [scheduler.submit("kb", name, lane="b") for name in ("b1", "b2", "b3")]  # one a pass: cost 1 < 2
        assert a1.result(30) == "a1:pass"
        assert [f.result(30) for f in quiet] == ["b1:cut", "b2:cut", "b3:pass"]
    finally:
        scheduler.close()
    # boundary 0: b1 cuts in (0.3 s); boundary 1: the pass has had ~0 s of its own, nothing;
    # boundary 2, after its 0.5 s step: b2; boundary 3: 0.6 s of cut-ins against 0.5 s, nothing
    assert log == [("pass", ["a1"]), ("cut in", ["b1"]), ("cut in", ["b2"]), ("pass", ["b3"])]


def test_only_a_pass_costing_less_cuts_in():
    held = _HeldPass(_Host([]), "b1", max_batch_images=8)
    scheduler = held.scheduler
    try:
        b1 = scheduler.submit("k", "b1", cost=10.0, lane="b")  # one image of 10 steps, say
        assert held.started.wait(30)
        a1 = scheduler.submit("k", "a1", cost=6.0, lane="a")
        a2 = scheduler.submit("k", "a2", cost=6.0, lane="a")  # a1 and a2 together cost more than b1's pass
        c1 = scheduler.submit("k", "c1", cost=10.0, lane="c")  # as much as b1's: it waits
        held.go.set()
        assert b1.result(30) == "b1:pass" and a1.result(30) == "a1:cut"
        assert a2.result(30) == "a2:pass" and c1.result(30) == "c1:pass"
    finally:
        scheduler.close()
    assert held.log[:3] == [("pass", ["b1"]), ("cut in", ["a1"]), ("pass", ["a2", "c1"])]


def test_a_lane_that_waited_out_another_lanes_pass_gets_the_next_pass_to_itself():
    """It could not cut in (here the host refuses): the next pass is its own, not shared with the
    lane whose pass it waited for (and, among others, oldest first as always)."""

    class Refusing(_Host):
        def can_run_between_steps(self, requests):
            return False

    held = _HeldPass(Refusing([]), "a1", max_batch_images=8)
    scheduler = held.scheduler
    try:
        a1 = scheduler.submit("k", "a1", lane="a")
        assert held.started.wait(30)
        waiting = [scheduler.submit("k", name, lane=lane) for name, lane in (("b1", "b"), ("a2", "a"), ("c1", "c"))]
        held.go.set()
        assert a1.result(30) == "a1:pass" and [f.result(30) for f in waiting] == ["b1:pass", "a2:pass", "c1:pass"]
    finally:
        scheduler.close()
    assert held.log == [("pass", ["a1"]), ("pass", ["b1", "c1"]), ("pass", ["a2"])]


def test_without_lanes_nothing_cuts_in_and_a_failing_cut_in_fails_only_itself():
    class Failing(_Host):
        def run_between_steps(self, requests):
            raise ValueError("boom")

    held = _HeldPass(Failing([]), "x1", max_batch_images=2)
    scheduler = held.scheduler
    try:
        x1 = scheduler.submit("k", "x1", images=2)
        assert held.started.wait(30)
        x2 = scheduler.submit("k", "x2")  # no lane: it waits for the pass
        y = scheduler.submit("k", "y", lane="b")
        held.go.set()
        assert x1.result(30) == "x1:pass"
        with pytest.raises(ValueError):
            y.result(30)
        assert x2.result(30) == "x2:pass"
    finally:
        scheduler.close()


# ---------------------------------------------------------------------------- the engine


def _request(fetcher, registry, adapters, prompt=PROMPT, seeds=(0,), steps=STEPS):
    uses = tuple(AdapterUse(fetcher.fetch(registry.resolve(ref)).adapter, weight) for ref, weight in adapters)
    return BatchRequest(uses, GenerationJob(prompt, None, steps, GUIDANCE, 32, 32, tuple(seeds)))


@pytest.fixture(scope="module")
def engine():
    return PipelineEngine(load_base("tiny").pipeline, resolve_placement("cpu"))


@pytest.mark.parametrize("host_adapters", [[], [("style1", 1.0)]], ids=["base-pass", "routed-pass"])
def test_a_pass_between_steps_leaves_both_passes_as_they_are_alone(engine, adapter_registry, fetcher, host_adapters):
    hosting = [_request(fetcher, adapter_registry, host_adapters, seeds=(1, 2)),
               _request(fetcher, adapter_registry, [("style2", 0.8)], prompt="a blue square", seeds=(3,))]
    cutting_in = [_request(fetcher, adapter_registry, [("style3", 1.0)], prompt="a green star", seeds=(4,), steps=3),
                  _request(fetcher, adapter_registry, [], seeds=(5,), steps=3)]  # steps of their own
    alone_host = [r.images for r in engine.run_batch(hosting)]
    alone_cut = [r.images for r in engine.run_batch(cutting_in)]
    scheduler = engine.pipe.scheduler
    cut: list = []

    def between_steps():
        if not cut:
            assert engine.can_run_between_steps(cutting_in)
            cut.extend(engine.run_between_steps(cutting_in))

    hosted = engine.run_batch(hosting, between_steps)
    assert len(cut) == 2 and all(r.cut_in for r in cut) and not any(r.cut_in for r in hosted)
    for got, alone in zip([r.images for r in hosted] + [r.images for r in cut], alone_host + alone_cut):
        assert np.array_equal(got, alone)
    assert engine.pipe.scheduler is scheduler  # the hosting pass's scheduler is back
    assert not any("forward" in vars(linear) for linear in engine.router._linears.values())  # nothing left routed


def test_the_engine_refuses_what_would_change_the_pass_under_way(adapter_registry, fetcher):
    engine = PipelineEngine(load_base("tiny").pipeline, resolve_placement("cpu"), fuse_after=1)
    routed = [_request(fetcher, adapter_registry, [("style3", 1.0)])]
    token = [_request(fetcher, adapter_registry, [("sks-token", 1.0)], prompt="a <sks> circle")]
    answers: dict[str, bool] = {}

    def ask(name):
        def between_steps():
            answers.setdefault(f"{name}: routed", engine.can_run_between_steps(routed))
            answers.setdefault(f"{name}: token", engine.can_run_between_steps(token))
        return between_steps

    assert not engine.can_run_between_steps(routed)  # no pass under way
    engine.run_batch([_request(fetcher, adapter_registry, [])], ask("base"))
    engine.run_batch([_request(fetcher, adapter_registry, [("style1", 1.0)])], ask("fused"))  # due at once
    engine.run_batch(token, ask("with a token loaded"))
    assert answers == {"base: routed": True, "base: token": False, "fused: routed": False, "fused: token": False,
                       "with a token loaded: routed": False, "with a token loaded: token": False}


# ---------------------------------------------------------------------------- admission


def test_a_quiet_tenants_first_request_goes_at_once_within_the_cut_in_places():
    async def scenario():
        fair = FairAdmission(capacity=2, cut_in=1)
        for _ in range(2):
            await fair.acquire("noisy", 1.0, None)
        queued = asyncio.create_task(fair.acquire("noisy", 1.0, None))
        await asyncio.sleep(0)
        assert not queued.done()  # at capacity, the noisy lane waits
        await asyncio.wait_for(fair.acquire("quiet", 1.0, None), 1)  # nothing in flight: it goes at once
        second = asyncio.create_task(fair.acquire("quiet", 1.0, None))
        other = asyncio.create_task(fair.acquire("other", 1.0, None))  # the one cut-in place is taken
        await asyncio.sleep(0)
        assert not second.done() and not other.done() and fair.in_flight == 3
        fair.release("quiet")  # 2 in flight: still at capacity
        await asyncio.sleep(0)
        assert not other.done()
        fair.release("noisy")  # a place: to the lane served least, the newcomer
        await asyncio.sleep(0)
        assert other.done() and not second.done() and not queued.done()
        for task in (queued, second):
            task.cancel()

    asyncio.run(scenario())
