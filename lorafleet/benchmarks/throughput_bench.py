"""Throughput under many adapters (part of `lorafleet bench serve`), per base, in one run.

1. images/s for N concurrent requests (64 by default) over 1, 10 and 100 adapters (all in the
   replica's host tier), as: lorafleet (a replica in this process: batching, routing, fusing);
   the naive diffusers loop (``load_lora_weights`` + ``unload_lora_weights`` per request, one at
   a time); and ``set_adapters`` per request without batching (every adapter preloaded);
2. p50/p95 latency at a fixed offered load below capacity (open loop, evenly spaced arrivals),
   lorafleet vs the set_adapters loop at the same load;
3. switch overhead: a request whose adapter is in host memory but not in the pipeline vs one
   whose adapter is already active, as a fraction of one generation;
4. the limit: the base's own batched throughput with no adapter at all, through the same
   denoising loop with no adapter machinery; the limit and the lorafleet scenarios are
   interleaved over ``rounds`` and each ratio is a median of within-round ratios;
5. what the engine's policy rests on: the time of one full pass (``max_batch_images`` images) in
   each mode: base, fused, active (peft layers), routed with one adapter, routed with all
   different adapters (row weights built per layer group, and per layer as before groups).

The replica is measured in-process (no HTTP, no Ray): `lorafleet bench serve`'s first section
measures what HTTP and Ray add per request. Each side runs in its own child process with all its
torch work on one thread: on this CPU a second live thread that has run torch ops slows every
OpenMP region of the process about 3x (see serve/replica.py), which would skew any comparison.
"""

from __future__ import annotations

import multiprocessing
import random
import statistics
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from lorafleet.accelerator import resolve_placement, seeded_generators
from lorafleet.bases import base_spec, load_base
from lorafleet.registry import AdapterRegistry, PublishRequest
from lorafleet.serve.adapter_cache import AdapterFetcher
from lorafleet.serve.engine import PipelineEngine
from lorafleet.serve.jobs import AdapterUse, BatchRequest, GenerationJob
from lorafleet.serve.replica import GenerationTask, GeneratorReplica
from lorafleet.serve.sampler import BatchShape, ImageSpec, sample_images
from lorafleet.serve.settings import ServeSettings
from lorafleet.synthetic import synthetic_lora

PROMPT = "a red circle on the left"
GUIDANCE = 7.5
SCENARIOS = (1, 10, 100)  # distinct adapters in the traffic


def publish_synthetic_adapters(registry, spec, count: int, directory: Path) -> list[tuple[object, Path]]:
    """``count`` random LoRAs for ``spec`` published as bench0..N-1: (manifest, pulled file) each."""
    directory.mkdir(parents=True, exist_ok=True)
    published = []
    for index in range(count):
        path = directory / f"adapter{index}.safetensors"
        path.write_bytes(synthetic_lora(spec, seed=index).to_bytes())
        manifest = registry.publish(path, PublishRequest(name=f"bench{index}", base=spec))
        published.append((manifest, registry.pull(manifest.name, directory / "pulled")[1]))
    return published


class _Setup:
    """A registry with ``count`` adapters for ``base``, their files, and a job factory."""

    def __init__(self, base: str, count: int, steps: int, workdir: Path):
        self.base, self.steps = base, steps
        registry = AdapterRegistry(f"file://{workdir / 'registry'}")
        self.registry_uri = registry.uri
        published = publish_synthetic_adapters(registry, base_spec(base), count, workdir / "src")
        self.manifests = [manifest for manifest, _ in published]
        self.files = [path for _, path in published]
        loaded = load_base(base)
        self.size, self.family = loaded.native_size, loaded.family
        self.guided = self.family.guided(GUIDANCE, 1.0, None)  # UNet families: CFG on; Flux: the embedding only

    def job(self, seed: int):
        return GenerationJob(PROMPT, None, self.steps, GUIDANCE, self.size, self.size, (seed,))

    def task(self, adapter: int | None, seed: int):
        if adapter is None:
            return GenerationTask((), self.job(seed), "")
        manifest = self.manifests[adapter]
        return GenerationTask(((manifest, 1.0),), self.job(seed), manifest.digest)

    def replica(self, workdir: Path, fuse_after: int, max_batch_images: int):
        settings = ServeSettings(base=self.base, registry=self.registry_uri, fuse_after=fuse_after,
                                 batching={"max_batch_images": max_batch_images},
                                 cache={"disk_bytes": 0, "disk_dir": str(workdir / "cache"),
                                        "host_bytes": 4 * 1024**3})
        replica = GeneratorReplica(settings)
        for manifest in self.manifests:  # every adapter in the host tier, as the scenario says
            replica.fetcher.fetch(manifest)
        return replica


def _traffic(adapters: int, requests: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [0] * requests if adapters == 1 else [rng.randrange(adapters) for _ in range(requests)]


def _lorafleet_rate(setup: _Setup, replica, order: list[int], concurrency: int) -> dict:
    warm = [setup.task(index, 10_000 + n) for n, index in enumerate(order[:8])]
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(replica.generate, warm))
        tasks = [setup.task(index, n) for n, index in enumerate(order)]
        started = time.perf_counter()
        outputs = list(pool.map(replica.generate, tasks))
        elapsed = time.perf_counter() - started
    modes = Counter(output.mode for output in outputs)
    return {"images_per_s": len(tasks) / elapsed, "mean_batch": statistics.mean(o.batch_images for o in outputs),
            "modes": dict(modes)}


def _limit_rate(setup: _Setup, requests: int, batch: int) -> float:
    """The base alone: the same denoising loop, batches of ``batch``, no adapter machinery at all."""
    pipe = load_base(setup.base).pipeline
    shape = BatchShape(setup.size, setup.size, setup.steps, setup.guided)
    specs = [ImageSpec(PROMPT, None, GUIDANCE, seed) for seed in range(requests)]
    sample_images(pipe, shape, specs[:batch])  # warm-up
    started = time.perf_counter()
    for start in range(0, requests, batch):
        sample_images(pipe, shape, specs[start:start + batch])
    return requests / (time.perf_counter() - started)


def _pipe_call(pipe, setup: _Setup, seed: int) -> None:
    pipe(PROMPT, num_inference_steps=setup.steps, guidance_scale=GUIDANCE, width=setup.size, height=setup.size,
         generator=seeded_generators([seed]), output_type="np", **setup.family.pipeline_call_options(pipe))


def _naive_rate(setup: _Setup, order: list[int]) -> float:
    pipe = load_base(setup.base).pipeline
    _pipe_call(pipe, setup, 0)
    started = time.perf_counter()
    for seed, index in enumerate(order):
        pipe.load_lora_weights(str(setup.files[index]))
        _pipe_call(pipe, setup, seed)
        pipe.unload_lora_weights()
    return len(order) / (time.perf_counter() - started)


class _SetAdaptersLoop:
    """Every adapter preloaded under its own name; per request ``set_adapters`` then one call."""

    def __init__(self, setup: _Setup, adapters: int):
        self.setup = setup
        self.pipe = load_base(setup.base).pipeline
        for index in range(adapters):
            self.pipe.load_lora_weights(str(setup.files[index]), adapter_name=f"a{index}")
        _pipe_call(self.pipe, setup, 0)

    def generate(self, index: int, seed: int) -> None:
        self.pipe.set_adapters([f"a{index}"])
        _pipe_call(self.pipe, self.setup, seed)

    def rate(self, order: list[int]) -> float:
        started = time.perf_counter()
        for seed, index in enumerate(order):
            self.generate(index, seed)
        return len(order) / (time.perf_counter() - started)


def _open_loop(submit, order: list[int], rate: float) -> dict:
    """Requests arrive every 1/rate s whatever happens; latency = done - scheduled arrival."""
    latencies: list[float] = []
    lock = threading.Lock()
    started = time.perf_counter() + 0.05

    def one(n: int) -> None:
        arrival = started + n / rate
        time.sleep(max(0.0, arrival - time.perf_counter()))
        submit(order[n], n)
        with lock:
            latencies.append(time.perf_counter() - arrival)

    with ThreadPoolExecutor(max_workers=len(order)) as pool:
        list(pool.map(one, range(len(order))))
    values = np.array(latencies) * 1000
    return {"p50_ms": float(np.percentile(values, 50)), "p95_ms": float(np.percentile(values, 95))}


def _switch_overhead(setup: _Setup, workdir: Path, repeats: int) -> dict:
    """Sequential single requests: an adapter only in the host tier (never served, so it must be
    prepared for routing) vs one already prepared on the device, over one base-only generation."""
    replica = setup.replica(workdir / "switch", fuse_after=0, max_batch_images=1)
    try:
        def timed(adapter, seed):
            return replica.generate(setup.task(adapter, seed))

        total = lambda o: o.activate_ms + o.generation_ms  # noqa: E731 (both exclude the host-tier lookup)
        timed(None, 0), timed(0, 0)
        pairs = 3 * repeats  # interleaved, so that drift in machine speed cancels out
        base_runs, warm_runs, cold_runs = [], [], []
        for n in range(pairs):
            base_runs.append(timed(None, n))
            warm_runs.append(timed(0, n))
            cold_runs.append(timed(1 + n, n))  # never served before: prepared from the host tier now
        base = statistics.median(map(total, base_runs))
        warm_ms, cold_ms = statistics.median(map(total, warm_runs)), statistics.median(map(total, cold_runs))
        switch = statistics.median(total(c) - total(w) for c, w in zip(cold_runs, warm_runs))
        return {"generation_ms": base, "active_ms": warm_ms, "host_not_active_ms": cold_ms,
                "switch_overhead_fraction": switch / base, "adapter_overhead_fraction": (warm_ms - base) / base,
                "modes": dict(Counter(o.mode for o in warm_runs + cold_runs))}
    finally:
        replica.scheduler.close()


def _peft_layers_pass(setup: _Setup, batch: int):
    """The same pass on peft's injected layers (diffusers ``load_lora_weights``): the unfused alternative."""
    pipe = load_base(setup.base).pipeline
    pipe.load_lora_weights(str(setup.files[0]))
    shape = BatchShape(setup.size, setup.size, setup.steps, setup.guided)
    specs = [ImageSpec(PROMPT, None, GUIDANCE, seed) for seed in range(batch)]
    return lambda repeat, warm_up=False: sample_images(pipe, shape, specs)


def _pass_costs(setup: _Setup, batch: int, repeats: int) -> dict:
    """Median seconds of one pass of ``batch`` images per engine mode (engines used directly).

    The modes take turns within each repeat, so that drift in machine speed moves them alike."""
    fetcher = AdapterFetcher(AdapterRegistry(setup.registry_uri), 4 * 1024**3, None)
    adapters = [fetcher.fetch(m).adapter for m in setup.manifests]

    def requests(indices):
        return [BatchRequest((AdapterUse(adapters[i], 1.0),) if i is not None else (), setup.job(n))
                for n, i in enumerate(indices)]

    def engine(**options) -> PipelineEngine:
        return PipelineEngine(load_base(setup.base).pipeline, resolve_placement("cpu"), max_active=4, **options)

    def runs(engine, make, mode):
        def run(repeat, warm_up=False):
            results = engine.run_batch(make(repeat))
            assert warm_up or results[0].mode == mode, (results[0].mode, mode)
        return run

    plain, fusing, updates_only, per_layer = engine(), engine(fuse_after=1), engine(row_weights_bytes=0), engine()
    per_layer.router.by_group = False
    injected = engine(fuse_after=1)
    all_different = lambda r: requests([(r * batch + i) % len(adapters) for i in range(batch)])  # noqa: E731
    cold = iter(range(batch, len(adapters)))
    modes = {
        "base": runs(plain, lambda _: requests([None] * batch), "base"),
        "routed_all_different": runs(plain, all_different, "mixed"),
        "routed_all_different_per_layer": runs(per_layer, all_different, "mixed"),
        "routed_updates_only_all_different": runs(updates_only, all_different, "mixed"),
        "routed_one_adapter": runs(plain, lambda _: requests([next(cold)] * batch), "mixed"),
        "peft_layers_one_adapter": _peft_layers_pass(setup, batch),
        "fused_one_adapter": runs(fusing, lambda _: requests([0] * batch), "fused"),
        # the warm-up fuses adapter 0 (its peft layers stay injected); then passes with no adapter
        "base_peft_layers_injected": runs(injected, lambda r: requests([None if r else 0] * batch), "base"),
    }
    for run in modes.values():  # warm-up; the process's first passes run slower
        run(0, warm_up=True), run(0, warm_up=True)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for repeat in range(repeats):
        for mode, run in modes.items():
            started = time.perf_counter()
            run(repeat + 1)
            times[mode].append(time.perf_counter() - started)
    return {f"pass_s_{mode}": statistics.median(seconds) for mode, seconds in times.items()}


def _diffusers_side(setup: _Setup, concurrency: int, max_batch_images: int, repeats: int) -> dict:
    """Child process: the limit and the two plain-diffusers loops, all on one torch thread."""
    torch_thread = ThreadPoolExecutor(max_workers=1)
    on_thread = lambda fn, *args: torch_thread.submit(fn, *args).result()  # noqa: E731
    results = on_thread(_pass_costs, setup, max_batch_images, repeats)
    for adapters in SCENARIOS:
        order = _traffic(adapters, concurrency)
        results[f"naive_{adapters}_images_per_s"] = on_thread(_naive_rate, setup, order)
        loop = on_thread(_SetAdaptersLoop, setup, adapters)
        results[f"set_adapters_{adapters}_images_per_s"] = on_thread(loop.rate, order)
    loop = on_thread(_SetAdaptersLoop, setup, 10)
    offered = 0.7 * results["set_adapters_10_images_per_s"]
    order = _traffic(10, max(16, concurrency // 2), seed=1)
    latency = _open_loop(lambda index, seed: on_thread(loop.generate, index, seed), order, offered)
    results["latency_offered_per_s"] = offered
    results.update({f"latency_set_adapters_{k}": v for k, v in latency.items()})
    return results


def _lorafleet_side(setup: _Setup, concurrency: int, repeats: int, workdir: Path, max_batch_images: int,
                    fuse_after: int, offered: float, rounds: int) -> dict:
    """Child process: one replica (its own pipeline thread); this thread only sends requests.

    The limit and every scenario run once per round, interleaved, on the replica's own pipeline
    thread and process: machine drift then moves all of a round alike, so each ratio is taken
    within a round and the median over rounds is reported."""
    replica = setup.replica(workdir / "throughput", fuse_after, max_batch_images)
    limit = lambda: replica.scheduler.call(lambda: _limit_rate(setup, concurrency, max_batch_images))  # noqa: E731
    per_round: list[dict] = []
    try:
        for _ in range(rounds):
            measured = {"limit_images_per_s": limit()}
            for adapters in (0, *SCENARIOS):  # 0: no adapter, the replica's own overhead over the limit
                order = [None] * concurrency if adapters == 0 else _traffic(adapters, concurrency)
                rate = _lorafleet_rate(setup, replica, order, concurrency)
                measured.update({f"lorafleet_{adapters}_{k}": v for k, v in rate.items()})
            per_round.append(measured)
        order = _traffic(10, max(16, concurrency // 2), seed=1)
        latency = _open_loop(lambda index, seed: replica.generate(setup.task(index, seed)), order, offered)
    finally:
        replica.scheduler.close()
    results = _over_rounds(per_round)
    results.update({f"latency_lorafleet_{k}": v for k, v in latency.items()})
    results.update({f"switch_{k}": v for k, v in _switch_overhead(setup, workdir, repeats).items()})
    return results


RATIOS = {  # name: (numerator, denominator), both images/s measured in the same round
    "ratio_100_to_1": ("lorafleet_100_images_per_s", "lorafleet_1_images_per_s"),
    "ratio_100_to_limit": ("lorafleet_100_images_per_s", "limit_images_per_s"),
    "ratio_1_to_limit": ("lorafleet_1_images_per_s", "limit_images_per_s"),
    "ratio_0_to_limit": ("lorafleet_0_images_per_s", "limit_images_per_s"),
}


def _over_rounds(per_round: list[dict]) -> dict:
    """Medians over rounds of every figure and of every within-round ratio, with each ratio's range."""
    results: dict = {"rounds": len(per_round)}
    for key, value in per_round[0].items():
        if isinstance(value, (int, float)):
            results[key] = statistics.median(r[key] for r in per_round)
        else:
            results[key] = value  # e.g. the modes of the first round
    rates = [r["limit_images_per_s"] for r in per_round]
    results["limit_spread"] = (max(rates) - min(rates)) / results["limit_images_per_s"]
    for name, (numerator, denominator) in RATIOS.items():
        ratios = [r[numerator] / r[denominator] for r in per_round]
        results[name] = statistics.median(ratios)
        results[f"{name}_min"], results[f"{name}_max"] = min(ratios), max(ratios)
    return results


def _in_child(fn, *args):
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as child:
        return child.submit(fn, *args).result()


def bench_throughput(base: str, steps: int, concurrency: int, repeats: int, workdir: Path,
                     max_batch_images: int = 8, fuse_after: int = 4, rounds: int = 3) -> dict:
    setup = _Setup(base, max(SCENARIOS), steps, workdir)
    results: dict = {"base": base, "steps": steps, "requests": concurrency, "max_batch_images": max_batch_images}
    results.update(_in_child(_diffusers_side, setup, concurrency, max_batch_images, repeats))
    results.update(_in_child(_lorafleet_side, setup, concurrency, repeats, workdir, max_batch_images, fuse_after,
                             results["latency_offered_per_s"], rounds))
    results["speedup_100_vs_naive"] = results["lorafleet_100_images_per_s"] / results["naive_100_images_per_s"]
    results["speedup_100_vs_set_adapters"] = (results["lorafleet_100_images_per_s"]
                                              / results["set_adapters_100_images_per_s"])
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}
