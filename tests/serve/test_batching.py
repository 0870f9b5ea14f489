"""Batches of requests for different adapters: same images as alone, fair, and through the replica."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from serve_setup import GUIDANCE, PROMPT, STEPS, diffusers_set_image, run_one

from lorafleet.accelerator import resolve_placement
from lorafleet.bases import load_base
from lorafleet.families import SD1
from lorafleet.serve.batching import BatchScheduler
from lorafleet.serve.engine import PipelineEngine
from lorafleet.serve.jobs import AdapterUse, BatchRequest, GenerationJob, shared_pass_key
from lorafleet.serve.replica import GenerationTask, GeneratorReplica
from lorafleet.serve.settings import Batching, ServeSettings

TOLERANCE = 1e-4  # max abs pixel difference, CPU fp32


def _engine(**options) -> PipelineEngine:
    return PipelineEngine(load_base("tiny").pipeline, resolve_placement("cpu"), **options)


def _request(fetcher, registry, adapters, prompt=PROMPT, negative=None, guidance=GUIDANCE, seeds=(0,)):
    uses = tuple(AdapterUse(fetcher.fetch(registry.resolve(ref)).adapter, weight) for ref, weight in adapters)
    return BatchRequest(uses, GenerationJob(prompt, negative, STEPS, guidance, 32, 32, tuple(seeds)))


def _mixed_requests(fetcher, registry) -> list[BatchRequest]:
    return [
        _request(fetcher, registry, [("style0", 1.0)]),  # UNet and text-encoder LoRA
        _request(fetcher, registry, [("style1", 0.5)], prompt="a blue square", negative="red", guidance=3.0, seeds=(3,)),
        _request(fetcher, registry, [], seeds=(1,)),  # no adapter at all
        _request(fetcher, registry, [("style1", 0.7), ("style2", 0.4)], seeds=(4, 5)),  # composed, two images
        _request(fetcher, registry, [("style1", 1.0)], prompt="a green star", seeds=(6,)),  # same adapter, new weight
        _request(fetcher, registry, [("style3", 1.0)], guidance=1.5, seeds=(7,)),
    ]


def _reference(request: BatchRequest, pulled_files) -> np.ndarray:
    by_digest = {use.adapter.digest: use.adapter.manifest.name for use in request.uses}
    files = {pulled_files[by_digest[use.adapter.digest]]: use.weight for use in request.uses}
    job = request.job
    return diffusers_set_image(files, job.prompt, job.negative_prompt, job.seeds, guidance=job.guidance_scale)


FORMS = {0: {"update"}, 1024**3: {"weights"}}


@pytest.mark.parametrize("row_weights_bytes", list(FORMS), ids=["lora-updates", "row-weights"])
def test_a_mixed_batch_gives_each_request_the_images_it_gets_alone(adapter_registry, pulled_files, fetcher,
                                                                     row_weights_bytes):
    """Alone = plain diffusers with that request's adapters, weights, prompt, guidance and seeds."""
    requests = _mixed_requests(fetcher, adapter_registry)
    keys = {shared_pass_key(r.uses, r.job, SD1) for r in requests}
    assert len(keys) == 1  # one pass for all of them
    engine = _engine(row_weights_bytes=row_weights_bytes)
    together = engine.run_batch(requests)
    assert set(engine.router.last_forms.values()) == FORMS[row_weights_bytes]
    assert {r.mode for r in together} == {"mixed"} and together[0].batch_images == 7
    for request, batched in zip(requests, together):
        assert np.abs(batched.images - _reference(request, pulled_files)).max() <= TOLERANCE, request.uses
    alone_engine = _engine()
    for request, batched in zip(requests, together):  # and the engine's own single-request passes
        assert np.abs(run_one(alone_engine, list(request.uses), request.job).images - batched.images).max() <= TOLERANCE


@pytest.mark.parametrize("row_weights_bytes", list(FORMS), ids=["lora-updates", "merged"])
def test_a_pass_whose_images_share_one_set_merges_it_once_and_gives_the_images_it_gets_alone(
        adapter_registry, pulled_files, fetcher, row_weights_bytes):
    """Every image with the same weighted set (composed here): each layer's set is merged into one
    weight for the pass, whatever the rows, so each step costs what the base product costs."""
    requests = [_request(fetcher, adapter_registry, [("style1", 0.7), ("style2", 0.4)], prompt=prompt, seeds=seeds)
                for prompt, seeds in ((PROMPT, (4, 5)), ("a green star", (6,)))]
    engine = _engine(row_weights_bytes=row_weights_bytes)
    together = engine.run_batch(requests)
    assert set(engine.router.last_forms.values()) == ({"update"} if row_weights_bytes == 0 else {"merged"})
    assert {r.mode for r in together} == {"mixed"} and together[0].batch_images == 3
    for request, batched in zip(requests, together):
        assert np.abs(batched.images - _reference(request, pulled_files)).max() <= TOLERANCE


def test_a_batch_of_one_adapter_per_image_builds_row_weights_per_layer_group_and_gives_the_images_alone(
        adapter_registry, pulled_files, fetcher):
    """Every image on one adapter (the many-adapter traffic): each group of same-shaped layers the
    images' adapters share gets its row weights in one batched build; the images are still exact,
    whatever their weights. A layer only one adapter has (style0's text encoder) builds its own."""
    requests = [
        _request(fetcher, adapter_registry, [("style0", 1.0)]),
        _request(fetcher, adapter_registry, [("style1", 0.5)], prompt="a blue square", seeds=(3,)),
        _request(fetcher, adapter_registry, [("style1", 1.0)], prompt="a green star", seeds=(6,)),
        _request(fetcher, adapter_registry, [("style3", 1.3)], seeds=(7, 8)),
    ]
    engine = _engine(row_weights_bytes=1024**3)
    together = engine.run_batch(requests)
    routed = set(engine.router.last_forms)
    unet = {name for name in routed if name.startswith("unet.")}
    assert set(engine.router.last_forms.values()) == {"weights"} and together[0].batch_images == 5
    assert engine.router.last_grouped == unet and routed - unet  # the text encoder's layers built alone
    for request, batched in zip(requests, together):
        assert np.abs(batched.images - _reference(request, pulled_files)).max() <= TOLERANCE, request.uses


def _routed_images(down: torch.Tensor, up: torch.Tensor, layer: str) -> list:
    """One adapter per image with only ``layer``: image i's ``A`` is ``down[i]``, its ``B`` ``up[i]``."""
    from lorafleet.serve.routing import RoutedAdapter, RoutedLayer

    return [((RoutedAdapter(f"digest{i}", {layer: RoutedLayer(down[i], up[i])}), 1.0),) for i in range(len(down))]


def test_a_layer_takes_row_weights_only_where_they_pay_and_while_the_budget_lasts():
    from lorafleet.serve.routing import ROW_WEIGHTS_CACHE_BYTES, _Budget, _RoutedLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 256)
    down, up = torch.randn(2, 4, 256), torch.randn(2, 256, 4)  # two images, rank 4
    per_row = 256 * 256 * 4
    assert 4 * per_row == ROW_WEIGHTS_CACHE_BYTES

    def expected(x):
        a, b = down.repeat(x.shape[0] // 2, 1, 1), up.repeat(x.shape[0] // 2, 1, 1)
        return linear(x) + x @ a.transpose(1, 2) @ b.transpose(1, 2)

    cases = [  # rows, tokens, budget, form
        (4, 16, 1024**3, "weights"),  # in cache
        (8, 16, 1024**3, "update"),  # out of cache and larger than 16 tokens in and out
        (8, 128, 1024**3, "weights"),  # no larger than 128 tokens in and out
        (8, 128, 8 * per_row - 1, "update"),  # over the budget
    ]
    for rows, tokens, budget, form in cases:
        routed = _RoutedLinear(linear, "unet.layer", _routed_images(down, up, "unet.layer"), _Budget(budget))
        x = torch.randn(rows, tokens, 256)
        with torch.no_grad():
            assert torch.allclose(routed(x), expected(x), atol=1e-4)
        assert routed.form == form, (rows, tokens, budget)


def test_a_layer_whose_images_share_their_adapters_takes_one_merged_weight_within_the_budget():
    from lorafleet.serve.routing import _Budget, _RoutedLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 256)
    down, up = torch.randn(1, 4, 256).repeat(2, 1, 1), torch.randn(1, 256, 4).repeat(2, 1, 1)  # two images, one set
    merged_bytes = 256 * 256 * 4
    for rows, tokens, budget, form in [(8, 16, merged_bytes, "merged"), (8, 16, merged_bytes - 1, "update")]:
        routed = _RoutedLinear(linear, "unet.layer", _routed_images(down, up, "unet.layer"), _Budget(budget),
                               uniform=True)
        x = torch.randn(rows, tokens, 256)
        with torch.no_grad():
            assert torch.allclose(routed(x), linear(x) + x @ down[0].T @ up[0].T, atol=1e-4)
        assert routed.form == form, (rows, tokens, budget)


def test_routing_leaves_no_layer_replaced_even_when_the_pass_fails(adapter_registry, fetcher):
    engine = _engine(row_weights_bytes=1024**3)
    images = [engine.routed.image_adapters(r) for r in _mixed_requests(fetcher, adapter_registry)]
    layers = [engine.router._module(name) for name in {n for image in images for a, _ in image for n in a.layers}]
    with pytest.raises(ZeroDivisionError), engine.router.route(images):
        assert all("forward" in vars(layer) for layer in layers)
        raise ZeroDivisionError("a failing pass")
    assert all("forward" not in vars(layer) for layer in layers)


def test_policy_routes_until_a_set_is_due_to_fuse_and_routes_again_after(adapter_registry, fetcher):
    engine = _engine(max_active=4, fuse_after=3)
    style1 = _request(fetcher, adapter_registry, [("style1", 1.0)])
    modes = [engine.run_batch([style1, style1])[0].mode for _ in range(4)]
    assert modes == ["mixed", "mixed", "fused", "fused"]
    mixed = engine.run_batch(_mixed_requests(fetcher, adapter_registry))
    assert mixed[0].mode == "mixed" and mixed[0].fuse_events == ["unfuse"]
    assert engine.run_batch([style1])[0].mode == "mixed"  # injected, but routing is as cheap
    assert engine.run_batch([_request(fetcher, adapter_registry, [])])[0].mode == "base"
    never = _engine(max_active=4)  # fuse_after 0: nothing is ever injected
    for _ in range(3):
        assert never.run_batch([style1])[0].mode == "mixed"
    assert not never.tier.residency().digests


def _peft_layer_calls(engine) -> list[int]:
    """A counter of forward calls into the pipeline's peft LoRA layers, from now on."""
    from peft.tuners.lora import LoraLayer

    calls = [0]
    for component in engine.tier.components:
        for module in getattr(engine.pipe, component).modules():
            if isinstance(module, LoraLayer):
                module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_passes_that_need_no_peft_layer_run_without_their_per_call_cost(adapter_registry, fetcher):
    """Once a set was fused its peft layers stay injected; base, fused and routed passes run on the
    base layers beneath them (a disabled peft layer still costs a call per forward)."""
    engine = _engine(max_active=4, fuse_after=1)
    style0 = _request(fetcher, adapter_registry, [("style0", 1.0)])  # UNet and text-encoder LoRA
    assert engine.run_batch([style0])[0].mode == "fused"
    calls = _peft_layer_calls(engine)
    assert engine.run_batch([style0])[0].mode == "fused"
    assert engine.run_batch(_mixed_requests(fetcher, adapter_registry))[0].mode == "mixed"
    assert engine.run_batch([_request(fetcher, adapter_registry, [])])[0].mode == "base"
    assert calls[0] == 0
    layers = [m for c in engine.tier.components for m in getattr(engine.pipe, c).modules()]
    assert any(type(m).__name__ == "Linear" and hasattr(m, "lora_A") for m in layers)  # put back after each pass


def test_a_non_routable_adapter_splits_the_batch_by_adapter_set(adapter_registry, fetcher, tiny_spec, tmp_path):
    """A convolution LoRA cannot be routed per row; its requests run as their own pass."""
    from helpers import write_lora

    from lorafleet.registry import PublishRequest

    path = write_lora(tmp_path / "conv", tiny_spec, seed=5, targets=("conv1", "conv2"))
    adapter_registry.publish(path, PublishRequest(name="conv-style", base=tiny_spec))
    conv = _request(fetcher, adapter_registry, [("conv-style", 1.0)])
    other = _request(fetcher, adapter_registry, [("style1", 1.0)], seeds=(2,))
    results = _engine().run_batch([conv, other])
    assert [r.mode for r in results] == ["active", "active"] and [r.batch_images for r in results] == [1, 1]
    alone = _engine()
    for request, result in zip([conv, other], results):
        assert np.abs(run_one(alone, list(request.uses), request.job).images - result.images).max() <= TOLERANCE


def test_the_oldest_request_is_always_in_the_next_pass():
    """Starvation check with keys that cannot share a pass: a hot key keeps arriving faster than
    it is served (three new hot requests per pass of two); a cold request still finishes within
    the passes of the requests ahead of it. Passes are released one at a time by the test."""
    passes: list[list[str]] = []
    gate, started = threading.Semaphore(0), threading.Semaphore(0)

    def run_batch(requests, between_steps):
        passes.append(list(requests))
        started.release()  # a pass began: the test may add arrivals, then let it finish
        gate.acquire()
        return requests

    scheduler = BatchScheduler(run_batch, max_batch_images=2)

    def one_pass(hot_arrivals: int) -> None:
        assert started.acquire(timeout=30)
        for _ in range(hot_arrivals):
            scheduler.submit("hot", "hot")
        gate.release()

    for _ in range(7):
        scheduler.submit("hot", "hot")
    for _ in range(3):
        one_pass(hot_arrivals=3)
    ahead = scheduler.waiting
    cold = scheduler.submit("cold", "cold")
    passes_before = len(passes)
    while ["cold"] not in passes:
        one_pass(hot_arrivals=3)
    served_after = len(passes) - passes_before
    assert cold.result(timeout=30) == "cold"
    assert ahead > 4 and scheduler.waiting > 4  # hot traffic really was queued all along
    assert served_after <= (ahead + 1) // 2 + 2  # its own pass, plus the hot passes ahead of it (2 per pass)
    assert ["cold"] in passes
    scheduler.close()
    for _ in range(scheduler.waiting + 1):  # let the pass in progress and the queued ones finish
        gate.release()


def test_the_batching_window_applies_only_while_the_replica_is_busy():
    """A request reaching an idle replica starts at once."""
    import time

    def run(requests, between_steps):
        time.sleep(0.05)
        return [len(requests)] * len(requests)

    scheduler = BatchScheduler(run, max_batch_images=8, wait_ms=400)
    try:
        for _ in range(2):
            started = time.perf_counter()
            assert scheduler.submit("k", 1).result() == 1
            assert time.perf_counter() - started < 0.3  # no 400 ms window at idle
            time.sleep(0.5)  # idle again
    finally:
        scheduler.close()


def _closed_loop(scheduler, clients: int, requests: int, think_s: float) -> None:
    """``clients`` callers, each sending its next request ``think_s`` after its last answer."""
    import time

    def client(_):
        for _ in range(requests):
            scheduler.submit("k", 1).result(timeout=30)
            time.sleep(think_s)

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))


def test_a_sequential_caller_never_waits_for_the_window():
    """Its request after a pass is the only one that pass's callers will send: nothing to wait for."""
    import time

    starts = []

    def run(requests, between_steps):
        starts.append(time.monotonic())
        time.sleep(0.05)
        return requests

    scheduler = BatchScheduler(run, max_batch_images=8, wait_ms=1000)
    try:
        started = time.monotonic()
        _closed_loop(scheduler, clients=1, requests=4, think_s=0.02)
        assert time.monotonic() - started < 0.9  # 4 x (50 + 20) ms; a waited window would be 1 s each
    finally:
        scheduler.close()


def test_after_a_pass_the_window_waits_for_its_callers_to_come_back():
    """Closed-loop callers come back a round trip after their answers: the next pass waits for them
    (up to ``wait_ms``) instead of starting with whoever came back first and leaving the rest for a
    pass of their own, and starts as soon as they are all there, not at the end of the window."""
    import time

    passes = []

    def run(requests, between_steps):
        passes.append((time.monotonic(), len(requests)))
        time.sleep(0.05)
        return requests

    scheduler = BatchScheduler(run, max_batch_images=8, wait_ms=1000)
    try:
        _closed_loop(scheduler, clients=4, requests=5, think_s=0.03)
    finally:
        scheduler.close()
    sizes = [size for _, size in passes]
    # an idle start with whoever is there (the callers' first requests race it), then every caller
    assert sizes[1:5] == [4, 4, 4, 4] and sum(sizes) == 20, sizes
    assert passes[4][0] - passes[1][0] < 0.9, passes  # three rounds of 50 + 30 ms, not three windows


def _pass_sizes(clients: int, think_s: float, pass_s: float, **window) -> list[int]:
    import time

    sizes = []

    def run(requests, between_steps):
        sizes.append(len(requests))
        time.sleep(pass_s)
        return requests

    scheduler = BatchScheduler(run, max_batch_images=clients, **window)
    try:
        _closed_loop(scheduler, clients=clients, requests=5, think_s=think_s)
    finally:
        scheduler.close()
    return sizes


def test_callers_back_later_than_wait_ms_but_early_in_a_pass_still_share_the_next_pass():
    """Through HTTP and Ray a caller comes back tens of ms after its answer (measured on `tiny`
    under load: 35-70 ms), longer than ``wait_ms`` (5 ms) but short beside a pass (250 ms). With
    ``wait_ms`` alone the passes settled into one image, then the seven that came back during it,
    for good (every request waited a pass: 13-16 images/s against 22-23 with the replica's
    defaults). The replica's defaults also wait up to a share of the pass that just ended."""
    defaults = Batching()
    full = _pass_sizes(8, think_s=0.02, pass_s=0.25, wait_ms=defaults.wait_ms,
                       wait_pass_share=defaults.wait_pass_share)
    assert full[1:5] == [8, 8, 8, 8] and sum(full) == 40, full  # after the idle start: every caller
    split = _pass_sizes(8, think_s=0.02, pass_s=0.25, wait_ms=defaults.wait_ms)
    assert max(split[2:]) < 8 and len(split) > len(full) + 2, split


def test_a_tenant_that_waited_out_another_s_pass_does_not_wait_for_its_callers():
    """Tenant b waited out a's pass; a's callers, when they come back, would not share b's pass
    (a lane that waited out another's pass gets one without it), so b's pass starts at once."""
    import time

    def run(requests, between_steps):
        time.sleep(0.1)
        return requests

    scheduler = BatchScheduler(run, max_batch_images=8, wait_ms=1000)
    try:
        first = scheduler.submit("k", "a1", lane="a")
        time.sleep(0.03)  # a1's pass is under way
        started = time.monotonic()
        assert scheduler.submit("k", "b1", lane="b").result(timeout=30) == "b1"
        assert time.monotonic() - started < 0.6  # the rest of a's pass and its own, not a 1 s window
        assert first.result() == "a1"
    finally:
        scheduler.close()


def test_a_failing_pass_fails_only_its_own_requests():
    def run_batch(requests, between_steps):
        if "bad" in requests:
            raise ValueError("boom")
        return requests

    scheduler = BatchScheduler(run_batch, max_batch_images=4)
    bad = scheduler.submit("k", "bad")
    with pytest.raises(ValueError):
        bad.result(timeout=10)
    assert scheduler.submit("k", "good").result(timeout=10) == "good"
    scheduler.close()


def test_concurrent_requests_to_a_replica_share_passes_and_keep_their_images(adapter_registry, tmp_path):
    settings = ServeSettings(base="tiny", registry=adapter_registry.uri, batching={"max_batch_images": 8},
                             cache={"disk_bytes": 0, "disk_dir": str(tmp_path / "cache")})
    replica = GeneratorReplica(settings, adapter_registry)

    def task(index: int) -> GenerationTask:
        name = f"style{index % 5}"
        manifest = adapter_registry.resolve(name)
        job = GenerationJob(PROMPT, None, STEPS, GUIDANCE, 32, 32, (index,))
        return GenerationTask(((manifest, 1.0),), job, manifest.digest)

    with ThreadPoolExecutor(max_workers=16) as pool:
        outputs = list(pool.map(replica.generate, [task(i) for i in range(16)]))
    assert max(o.batch_images for o in outputs) > 1
    for index in (0, 3, 7):
        alone = replica.generate(task(index))
        assert alone.batch_images == 1
        assert np.abs(alone.images - outputs[index].images).max() <= TOLERANCE
    replica.scheduler.close()


@pytest.mark.gpu
def test_mixed_batch_matches_alone_on_cuda_in_half_precision(adapter_registry, fetcher):
    """The same property on a GPU, in float16 (looser bound: half-precision products)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    engine = PipelineEngine(load_base("tiny").pipeline.to("cuda", torch.float16), resolve_placement("cuda", "float16"))
    requests = _mixed_requests(fetcher, adapter_registry)
    together = engine.run_batch(requests)
    for request, batched in zip(requests, together):
        alone = run_one(engine, list(request.uses), request.job)
        assert np.abs(batched.images - alone.images).max() <= 1e-2
