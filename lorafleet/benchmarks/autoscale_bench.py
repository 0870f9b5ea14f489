"""`lorafleet bench autoscale`: Ray Serve autoscaling on a local cluster under a bounded burst.

0.5-CPU generator replicas, min 1, max 3: a burst of concurrent requests scales the replicas
up; after it they come back down. Prints when each happened.
"""

from __future__ import annotations

# Imports inside functions: every benchmark's arguments are added when the parser is built; its
# heavy imports wait for its run.
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from . import positive_int


def _running_replicas() -> int:
    from ray import serve

    status = serve.status().applications["lorafleet"].deployments["Generator"]
    return int(status.replica_states.get("RUNNING", 0))


def run_autoscale(burst_requests: int = 60, concurrency: int = 8, steps: int = 30, settle_s: float = 90.0) -> dict:
    from lorafleet.local_cluster import free_port
    from lorafleet.serve.server import start_server
    from lorafleet.serve.settings import ServeSettings

    with tempfile.TemporaryDirectory(prefix="lorafleet-autoscale-") as tmp:
        settings = ServeSettings(
            registry=f"file://{Path(tmp) / 'registry'}", port=free_port(), replica_num_cpus=0.5,
            max_ongoing_requests=2, max_queued_requests=200,
            autoscaling={"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1,
                         "upscale_delay_s": 1, "downscale_delay_s": 5, "metrics_interval_s": 0.5,
                         "look_back_period_s": 2},
            cache={"disk_dir": str(Path(tmp) / "cache")},
        )
        server = start_server(settings, num_cpus=2)
        try:
            return _burst_and_watch(server.url, burst_requests, concurrency, steps, settle_s)
        finally:
            server.stop()


def _burst_and_watch(url: str, burst_requests: int, concurrency: int, steps: int, settle_s: float) -> dict:
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    started = time.monotonic()

    def watch():
        while not stop.is_set():
            samples.append((time.monotonic() - started, _running_replicas()))
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    client = httpx.Client(base_url=url, timeout=300)
    statuses: list[int] = []
    with ThreadPoolExecutor(concurrency) as pool:
        body = {"prompt": "a red circle", "steps": steps, "seed": 0, "cache": False}  # load on replicas, not the cache
        statuses = list(pool.map(lambda _: client.post("/v1/generate", json=body).status_code,
                                 range(burst_requests)))
    burst_end = time.monotonic() - started
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline and (not samples or samples[-1][1] > 1):
        time.sleep(0.5)
    time.sleep(1)
    stop.set()
    watcher.join()
    peak = max(count for _, count in samples)
    first_up = next((round(t, 1) for t, count in samples if count > 1), None)
    back_down = next((t for t, count in samples if t > burst_end and count == 1), None)
    return {"burst_requests": burst_requests, "concurrency": concurrency, "ok": statuses.count(200),
            "errors": len(statuses) - statuses.count(200), "peak_replicas": peak,
            "first_scale_up_s": first_up, "burst_seconds": round(burst_end, 1),
            "back_to_min_after_burst_s": round(back_down - burst_end, 1) if back_down else None,
            "final_replicas": samples[-1][1]}


def cmd_bench_autoscale(args) -> int:
    from .registry_bench import emit

    result = run_autoscale(args.requests, args.concurrency, args.steps)
    return emit([result], transpose=True)


def add_arguments(parser) -> None:
    parser.add_argument("--requests", type=positive_int, default=60)
    parser.add_argument("--concurrency", type=positive_int, default=8)
    parser.add_argument("--steps", type=positive_int, default=30)
    parser.set_defaults(handler=cmd_bench_autoscale)
