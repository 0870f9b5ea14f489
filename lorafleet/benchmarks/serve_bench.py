"""`lorafleet bench serve`: the serving core's costs, per base (small and tiny), in one run.

(a) overhead of HTTP + Ray over calling the pipeline directly, for one generation;
(b) a request whose adapter is already active vs cached in host memory vs only in the
    registry, as the extra time over a base-only request, in units of one generation;
(c) 100 requests over 10 adapters: the naive diffusers loop (load_lora_weights +
    unload_lora_weights per request) vs lorafleet over HTTP (sequential, then 4 concurrent).
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from lorafleet.demo import synthetic_lora

PROMPT = "a red circle on the left"


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def _publish_adapters(registry, spec, count: int, directory: Path) -> list[Path]:
    from lorafleet.registry import PublishRequest

    files = []
    for index in range(count):
        path = directory / f"adapter{index}.safetensors"
        path.write_bytes(synthetic_lora(spec, seed=index).to_bytes())
        manifest = registry.publish(path, PublishRequest(name=f"bench{index}", base=spec))
        files.append(registry.pull(manifest.name, directory / "pulled")[1])
    return files


def _direct_ms(base: str, steps: int, repeats: int) -> float:
    from lorafleet.bases import load_base

    pipe = load_base(base).pipeline

    def one():
        pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np")

    one()  # warm-up
    return _median_ms(one, repeats)


def _naive_loop_s(base: str, files: list[Path], order: list[int], steps: int) -> float:
    """What one would write with plain diffusers: load, generate, unload, per request."""
    from lorafleet.bases import load_base

    pipe = load_base(base).pipeline
    started = time.perf_counter()
    for index in order:
        pipe.load_lora_weights(str(files[index]))
        pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np")
        pipe.unload_lora_weights()
    return time.perf_counter() - started


class _Client:
    def __init__(self, url: str, steps: int):
        self.http = httpx.Client(base_url=url, timeout=300)
        self.steps = steps

    def generate(self, adapter: str | None = None) -> dict:
        body = {"prompt": PROMPT, "steps": self.steps, "seed": 0, **({"adapter": adapter} if adapter else {})}
        response = self.http.post("/v1/generate", json=body)
        response.raise_for_status()
        return response.json()


def _tier_costs(client: _Client, generation_ms: float, repeats: int) -> dict:
    """Extra ms over a base-only request for: active, host-cached, registry-only adapters."""
    base_ms = _median_ms(lambda: client.generate(), repeats)
    client.generate("bench0")
    active_ms = _median_ms(lambda: client.generate("bench0"), repeats)
    host_runs, registry_runs = [], []
    for index in range(repeats):
        client.generate("bench1")  # bench0 leaves the active tier (one slot), stays in host memory
        host_runs.append(client.generate("bench0")["timings"]["total_ms"])
        registry_runs.append(client.generate(f"bench{2 + index}")["timings"]["total_ms"])  # never fetched yet
    costs = {"active": active_ms, "host": statistics.median(host_runs), "registry": statistics.median(registry_runs)}
    return {f"{tier}_extra_per_generation": round((ms - base_ms) / generation_ms, 3) for tier, ms in costs.items()}


def _throughput(client: _Client, order: list[int], workers: int) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(lambda i: client.generate(f"bench{i}"), order))
    return len(order) / (time.perf_counter() - started)


def _with_server(base: str, registry_uri: str, workdir: Path, cache: dict, fn):
    from lorafleet.devtools.seaweed import free_port
    from lorafleet.serve.server import start_server
    from lorafleet.serve.settings import ServeSettings

    settings = ServeSettings(base=base, registry=registry_uri, port=free_port(), replicas=1, replica_num_cpus=2,
                             max_ongoing_requests=4, max_queued_requests=64,
                             cache={"disk_bytes": 0, "disk_dir": str(workdir / "cache"), **cache})
    server = start_server(settings, num_cpus=2)
    try:
        return fn(_Client(server.url, settings.limits.default_steps))
    finally:
        server.stop()


def bench_base(base: str, steps: int, requests: int, repeats: int, workdir: Path) -> dict:
    from lorafleet.bases import base_spec
    from lorafleet.registry import AdapterRegistry

    (workdir / base).mkdir(parents=True, exist_ok=True)
    registry = AdapterRegistry(f"file://{workdir / base / 'registry'}")
    files = _publish_adapters(registry, base_spec(base), 10 + repeats, workdir / base)
    order = [random.Random(0).randrange(10) for _ in range(requests)]
    direct_ms = _direct_ms(base, steps, repeats)
    naive_rate = requests / _naive_loop_s(base, files[:10], order, steps)

    def single_slot(client: _Client) -> dict:  # one active slot: host and registry paths are observable
        client.steps = steps
        client.generate()
        http_ms = _median_ms(lambda: client.generate(), repeats)
        return {"http_ms": http_ms, **_tier_costs(client, direct_ms, repeats)}

    def throughput(client: _Client) -> dict:  # default tiers: 10 adapters stay active
        client.steps = steps
        client.generate()
        return {"sequential": _throughput(client, order, 1), "concurrent": _throughput(client, order, 4)}

    costs = _with_server(base, registry.uri, workdir, {"active_max_adapters": 1}, single_slot)
    rates = _with_server(base, registry.uri, workdir, {"active_max_adapters": 10}, throughput)
    http_ms = costs.pop("http_ms")
    return {
        "base": base, "steps": steps, "direct_generation_ms": round(direct_ms, 1),
        "http_ray_generation_ms": round(http_ms, 1),
        "http_ray_overhead_pct": round(100 * (http_ms - direct_ms) / direct_ms, 1),
        **costs,
        "naive_images_per_s": round(naive_rate, 2),
        "lorafleet_sequential_images_per_s": round(rates["sequential"], 2),
        "lorafleet_4_concurrent_images_per_s": round(rates["concurrent"], 2),
        "speedup_sequential": round(rates["sequential"] / naive_rate, 2),
        "speedup_concurrent": round(rates["concurrent"] / naive_rate, 2),
    }


def run_serve_bench(bases: list[str], steps: int, requests: int, repeats: int) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="lorafleet-serve-bench-") as tmp:
        return [bench_base(base, steps, requests, repeats, Path(tmp)) for base in bases]


def cmd_bench_serve(args) -> int:
    from .registry_bench import emit

    results = run_serve_bench(args.bases.split(","), args.steps, args.requests, args.repeats)
    return emit(results, transpose=True)


def add_arguments(parser) -> None:
    parser.add_argument("--bases", default="small,tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.set_defaults(handler=cmd_bench_serve)
