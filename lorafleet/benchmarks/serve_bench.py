"""`lorafleet bench serve`: the serving core's costs, per base (small and tiny), in one run.

overhead section, over HTTP and Ray:
(a) overhead of HTTP + Ray over calling the pipeline directly, for one generation;
(b) a request whose adapter is already active vs cached in host memory vs only in the
    registry, as the extra time over a base-only request, in units of one generation.
throughput section (throughput_bench.py): many adapters at once, batching, latency under
load, switch overhead and the no-adapter limit.
"""

from __future__ import annotations

# Imports inside functions: every benchmark's arguments are added when the parser is built; its
# heavy imports wait for its run.
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from lorafleet.serve.ingress import DEFAULT_INGRESS, Ingress

from . import positive_int
from .http_bench import DEFAULT_IDLE_PAIRS

INGRESSES = tuple(ingress.value for ingress in Ingress)
PROMPT = "a red circle on the left"


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


class DirectCall:
    """One generation by calling the base's pipeline in this process: the server's defaults (the
    base's native size, the family's guidance), the reference every request-path figure is over."""

    def __init__(self, base: str, steps: int):
        from lorafleet.bases import load_base

        self.loaded, self.steps = load_base(base), steps
        self.options = self.loaded.family.pipeline_call_options(self.loaded.pipeline)
        self.ms()  # warm-up

    def ms(self) -> float:
        import torch

        size = self.loaded.native_size
        started = time.perf_counter()
        self.loaded.pipeline(PROMPT, num_inference_steps=self.steps, generator=torch.Generator().manual_seed(0),
                             output_type="np", height=size, width=size,
                             guidance_scale=self.loaded.family.default_guidance_scale, **self.options)
        return 1000 * (time.perf_counter() - started)

    def median_ms(self, repeats: int) -> float:
        return statistics.median(self.ms() for _ in range(repeats))


def _direct_ms(base: str, steps: int, repeats: int) -> float:
    return DirectCall(base, steps).median_ms(repeats)


class _Client:
    def __init__(self, url: str, steps: int):
        self.http = httpx.Client(base_url=url, timeout=300)
        self.steps = steps

    def generate(self, adapter: str | None = None) -> dict:
        body = {"prompt": PROMPT, "steps": self.steps, "seed": 0, "cache": False,  # generation, not the output cache
                **({"adapter": adapter} if adapter else {})}
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


def start_bench_server(**fields):
    """A started server (a local Ray cluster of 2 CPUs) with these settings on a free port."""
    from lorafleet.local_cluster import free_port
    from lorafleet.serve.server import start_server
    from lorafleet.serve.settings import ServeSettings

    for attempt in range(3):  # a port free when chosen can be taken by Ray's own processes meanwhile
        try:
            return start_server(ServeSettings(port=free_port(), **fields), num_cpus=2)
        except Exception as exc:
            if "bind" not in str(exc).lower() or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _with_server(base: str, registry_uri: str, workdir: Path, cache: dict, fn, ingress: str):
    server = start_bench_server(base=base, registry=registry_uri, replicas=1, replica_num_cpus=2,
                                max_ongoing_requests=4, max_queued_requests=64, ingress=ingress,
                                cache={"disk_bytes": 0, "disk_dir": str(workdir / "cache"), **cache})
    try:
        return fn(_Client(server.url, server.settings.limits.default_steps))
    finally:
        server.stop()


def bench_overhead(base: str, steps: int, repeats: int, workdir: Path, ingress: str = DEFAULT_INGRESS.value) -> dict:
    from lorafleet.bases import base_spec
    from lorafleet.registry import AdapterRegistry

    from .throughput_bench import publish_synthetic_adapters

    (workdir / base).mkdir(parents=True, exist_ok=True)
    registry = AdapterRegistry(f"file://{workdir / base / 'registry'}")
    publish_synthetic_adapters(registry, base_spec(base), 2 + repeats, workdir / base)
    direct_ms = _direct_ms(base, steps, repeats)

    def single_slot(client: _Client) -> dict:  # one active slot: host and registry paths are observable
        client.steps = steps
        client.generate()
        http_ms = _median_ms(lambda: client.generate(), repeats)
        return {"http_ms": http_ms, **_tier_costs(client, direct_ms, repeats)}

    costs = _with_server(base, registry.uri, workdir, {"active_max_adapters": 1}, single_slot, ingress)
    http_ms = costs.pop("http_ms")
    return {
        "base": base, "steps": steps, "direct_generation_ms": round(direct_ms, 1),
        "http_ray_generation_ms": round(http_ms, 1),
        "http_ray_overhead_pct": round(100 * (http_ms - direct_ms) / direct_ms, 1),
        **costs,
    }


def run_serve_bench(bases: list[str], steps: int, requests: int, repeats: int, sections: list[str],
                    rounds: int = 3, ingress: str = DEFAULT_INGRESS.value,
                    idle_pairs: int = DEFAULT_IDLE_PAIRS) -> list[dict]:
    from .throughput_bench import bench_throughput

    results = []
    with tempfile.TemporaryDirectory(prefix="lorafleet-serve-bench-") as tmp:
        for base in bases:
            row: dict = {"base": base, "ingress": ingress}
            if "overhead" in sections:
                row.update(bench_overhead(base, steps, repeats, Path(tmp) / "overhead", ingress))
            if "throughput" in sections:
                row.update(bench_throughput(base, steps, requests, repeats, Path(tmp) / "throughput" / base,
                                              rounds=rounds))
            if "http" in sections:
                from .http_bench import bench_http

                row.update(bench_http(base, steps, requests, rounds, Path(tmp) / "http" / base, ingress=ingress,
                                      idle_pairs=idle_pairs))
            results.append(row)
            print(json.dumps(row), flush=True)  # each base as soon as it is done
    return results


def cmd_bench_serve(args) -> int:
    from .registry_bench import emit

    sections = ["http"] if args.http and args.sections is None else (args.sections or "overhead,throughput").split(",")
    results = run_serve_bench(args.bases.split(","), args.steps, args.requests, args.repeats, sections, args.rounds,
                              args.ingress, args.idle_pairs)
    return emit(results, transpose=True)


def add_arguments(parser) -> None:
    parser.add_argument("--bases", default="small,tiny")
    parser.add_argument("--steps", type=positive_int, default=20)
    parser.add_argument("--requests", type=positive_int, default=64, help="concurrent requests per throughput scenario")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--rounds", type=positive_int, default=3,
                        help="throughput: interleaved rounds of the limit and every scenario (medians reported)")
    parser.add_argument("--sections", default=None, help="overhead, throughput, http (default overhead,throughput)")
    parser.add_argument("--http", action="store_true", help="through the public HTTP API of a started server: "
                        "throughput scenarios, where the time goes, Ray Serve's own floor beside it, the output cache "
                        "(benchmarks/http_bench.py)")
    parser.add_argument("--ingress", choices=INGRESSES, default=DEFAULT_INGRESS.value,
                        help="how HTTP reaches the gateway on the started server (serve setting ingress)")
    parser.add_argument("--idle-pairs", type=positive_int, default=DEFAULT_IDLE_PAIRS,
                        help="http: idle requests, each paired with a direct pipeline call (the overhead is their "
                             "median difference)")
    parser.set_defaults(handler=cmd_bench_serve)
