"""`lorafleet bench multiteam`: several teams on one server, through its HTTP API (tiny base).

- Fairness: tenant A floods at 5x the replicas' capacity (from a process of its own) while
  tenant B sends one request at a time; B's p50/p95 against B alone, with tenants (one fair
  lane each) and without (one queue), and B's p95 counted in full passes (a pass of `capacity`
  images under the flood): 2 means B waited one pass and then rode the next one. With tenants,
  B's requests cut into A's passes between two denoising steps (serve/batching.py); "B cut in"
  counts those that did.
- Canary: an alias split 90/10 over 1,000 sticky caller keys (the observed share of the canary).
- Pre-warm: the first request with an adapter on a fresh server, cold vs pre-warmed, in rounds.
"""

from __future__ import annotations

# Imports inside functions: each benchmark's heavy imports wait for its run.
import json
import multiprocessing
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from lorafleet.text_table import format_table

from . import in_fresh_process, positive_int

A_TOKEN, B_TOKEN = "a" * 40, "b" * 40
TENANTS = {"team-a": {"namespaces": ["a-"]}, "team-b": {"namespaces": ["b-"]}}


def _settings(registry: str, workdir: Path, tenants: bool, capacity: int, **extra):
    from lorafleet.local_cluster import free_port
    from lorafleet.serve.settings import ServeSettings

    tokens = (f"{A_TOKEN}=generate@team-a,{B_TOKEN}=generate@team-b" if tenants
              else f"{A_TOKEN}=generate,{B_TOKEN}=generate")
    return ServeSettings(base="tiny", registry=registry, port=free_port(), api_tokens=tokens,
                         tenants=TENANTS if tenants else {}, max_ongoing_requests=capacity,
                         max_queued_requests=1000, batching={"max_batch_images": capacity},
                         output_cache={"enabled": False}, cache={"disk_dir": str(workdir / "cache")}, **extra)


def _request(client: httpx.Client, token: str, steps: int, seed: int, adapter: str | None = None,
             passes: list | None = None, cut_ins: list | None = None) -> float:
    started = time.perf_counter()
    body = {"prompt": "a red circle", "steps": steps, "seed": seed, **({"adapter": adapter} if adapter else {})}
    response = client.post("/v1/generate", json=body, headers={"Authorization": f"Bearer {token}"})
    response.raise_for_status()
    if passes is not None:
        passes.append(response.json()["timings"]["generation_ms"] / 1000)
    if cut_ins is not None:
        cut_ins.append(response.json()["timings"]["cut_in"])
    return time.perf_counter() - started


def _percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


def flood(url: str, clients: int, steps: int, stop, queue) -> None:
    """Tenant A: ``clients`` threads in a loop until ``stop``; then (requests served, each pass's
    seconds) on ``queue``. In a process of its own, like a real client: its threads do not share
    the server's interpreter lock."""
    done, passes = Counter(), []

    def client_loop(index: int) -> None:
        seed = 10_000 * (index + 1)
        with httpx.Client(base_url=url, timeout=600) as client:
            while not stop.is_set():
                seed += 1
                _request(client, A_TOKEN, steps, seed, passes=passes)
                done["a"] += 1

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    queue.put((done["a"], passes))


def fairness(registry: str, workdir: Path, tenants: bool, capacity: int, requests: int, steps: int, queue) -> None:
    from lorafleet.serve.server import serving_in_thread

    context = multiprocessing.get_context("spawn")
    with serving_in_thread(_settings(registry, workdir, tenants, capacity)) as url, \
            httpx.Client(base_url=url, timeout=600) as client:
        for seed in range(3):  # warm-up
            _request(client, B_TOKEN, steps, seed)
        alone = [_request(client, B_TOKEN, steps, 100 + i) for i in range(requests)]
        stop, flooded = context.Event(), context.Queue()
        flooding = context.Process(target=flood, args=(url, 5 * capacity, steps, stop, flooded))
        flooding.start()
        time.sleep(4.0)  # the flood's process starts and fills the queue
        cut_ins: list[bool] = []
        loaded = [_request(client, B_TOKEN, steps, 500 + i, cut_ins=cut_ins) for i in range(requests)]
        stop.set()
        served, passes = flooded.get(timeout=600)
        flooding.join()
    (alone_p50, alone_p95), (loaded_p50, loaded_p95) = _percentiles(alone), _percentiles(loaded)
    full_pass = statistics.median(passes)  # a pass under the flood: capacity images
    queue.put({"queueing": "fair lane per tenant" if tenants else "one queue", "B alone p50 s": round(alone_p50, 3),
            "B alone p95 s": round(alone_p95, 3), "B under A's flood p50 s": round(loaded_p50, 3),
            "B under A's flood p95 s": round(loaded_p95, 3), "p95 ratio": round(loaded_p95 / alone_p95, 2),
            "full pass s": round(full_pass, 3), "B p95 in full passes": round(loaded_p95 / full_pass, 2),
            "B cut in": f"{sum(cut_ins)}/{len(cut_ins)}", "A requests served": served})


def canary_share(registry_uri: str, keys: int) -> dict:
    from lorafleet.registry import AdapterRegistry

    registry = AdapterRegistry(registry_uri)
    registry.split_alias("a-style", "prod", {1: 0.9, 2: 0.1})
    record = registry.alias_record("a-style", "prod")
    served = Counter(record.version_for(f"team-a\0user-{i}") for i in range(keys))
    return {"keys": keys, "weights": "v1 0.9, v2 0.1", "observed v2 share": round(served[2] / keys, 4)}


def first_request(registry: str, workdir: str, base: str, warm: bool, steps: int, queue) -> None:
    """A fresh server on ``base``: seconds to ready, then the first request with the adapter."""
    from lorafleet.serve.server import serving_in_thread

    extra = {"prewarm": [f"a-{base}@1"]} if warm else {}
    started = time.perf_counter()
    settings = _settings(registry, Path(workdir), True, 4, **extra).model_copy(update={"base": base})
    with serving_in_thread(settings) as url, httpx.Client(base_url=url, timeout=600) as client:
        ready_s = time.perf_counter() - started
        first = _request(client, A_TOKEN, steps, 1, adapter=f"a-{base}@1")
    queue.put({"prewarm": warm, "ready s": round(ready_s, 3), "first request s": round(first, 4)})


def prewarm_latency(registry: str, workdir: Path, base: str, rounds: int, steps: int) -> list[dict]:
    rows = []
    for index in range(rounds):  # interleaved: cold, warm; warm, cold
        for warm in ((False, True) if index % 2 == 0 else (True, False)):
            row = in_fresh_process(first_request, registry, str(workdir / f"p{index}{warm}"), base, warm, steps)
            rows.append({"round": index + 1, "base": base, **row})
    return rows


def _publish(registry_uri: str, prewarm_base: str) -> None:
    from lorafleet.bases import base_spec
    from lorafleet.registry import AdapterRegistry, PublishRequest
    from lorafleet.synthetic import synthetic_lora

    registry, spec = AdapterRegistry(registry_uri), base_spec("tiny")
    for seed in (1, 2):
        registry.publish_payload(synthetic_lora(spec, seed=seed), PublishRequest(name="a-style", base=spec,
                                                                                 aliases=["prod"]))
    big = base_spec(prewarm_base)
    registry.publish_payload(synthetic_lora(big, seed=3, rank=16), PublishRequest(name=f"a-{prewarm_base}", base=big))


def cmd_bench_multiteam(args) -> int:
    with tempfile.TemporaryDirectory(prefix="lorafleet-bench-multiteam-") as folder:
        workdir = Path(folder)
        registry = f"file://{workdir / 'registry'}"
        _publish(registry, args.prewarm_base)
        fair = [in_fresh_process(fairness, registry, workdir, tenants, args.capacity, args.requests, args.steps)
                for tenants in (True, False)]
        canary = canary_share(registry, 1000)
        warm = prewarm_latency(registry, workdir, args.prewarm_base, args.rounds, args.steps)
    print(format_table(fair))
    print(format_table([canary]))
    print(format_table(warm))
    cold = statistics.median(r["first request s"] for r in warm if not r["prewarm"])
    hot = statistics.median(r["first request s"] for r in warm if r["prewarm"])
    print(f"first request with the adapter: cold {cold * 1000:.1f} ms, pre-warmed {hot * 1000:.1f} ms "
          f"({cold / hot:.2f}x)")
    print(json.dumps({"fairness": fair, "canary": canary, "prewarm": warm}, indent=2))
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("--capacity", type=positive_int, default=4, help="max_ongoing_requests of the one replica")
    parser.add_argument("--requests", type=positive_int, default=40, help="tenant B's requests per scenario")
    parser.add_argument("--steps", type=positive_int, default=4)
    parser.add_argument("--rounds", type=positive_int, default=2, help="pre-warm rounds (cold and warm each)")
    parser.add_argument("--prewarm-base", default="small", help="the base of the pre-warm scenario")
    parser.set_defaults(handler=cmd_bench_multiteam)
