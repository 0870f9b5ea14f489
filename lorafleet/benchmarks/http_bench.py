"""`lorafleet bench serve --http`: what a user meets, measured through the public HTTP API of a
started server (Ray Serve: proxy, gateway, replica).

- Throughput: concurrent clients, no adapter / one / 10 / 100 adapters, interleaved in rounds;
  within a round every scenario runs in two halves, in an order and then its mirror (0 1 10 100
  100 10 1 0), so that a drift in machine speed over the round costs every scenario alike
  (medians and ranges, ratios to no adapter taken within each round, and every round's), beside
  the in-process naive diffusers loop over 100 adapters. No adapter runs twice per round, at two
  places: the ratio of the two is the bench's own noise in that run.
- Where the time goes: each response's own ``timings.breakdown`` (checks, resolve, output cache,
  backend call, inside the replica, waiting for a pass, the pass, encoding) and the client's own
  total (its excess over the server's total is HTTP and the proxy), at idle and under load; the
  idle latency over a direct pipeline call in the client's process: the median difference within
  pairs (a direct call just before or just after each idle request: the same machine, Ray Serve
  idle in the background), and over the direct call's p50 before Ray started.
- Ray Serve's own floor beside it (benchmarks/ray_floor.py): a trivial FastAPI deployment through
  the same proxy, one Serve handle hop, plain and multiplexed, and a plain Ray actor call.
- The output cache: prompts drawn from a Zipf distribution so that about 30 % of requests repeat
  an earlier one, with the cache and without (``"cache": false``), interleaved.
"""

from __future__ import annotations

# Imports inside functions: each benchmark's heavy imports wait for its run.
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from lorafleet.serve.heap import freeze_start_up_heap
from lorafleet.serve.ingress import DEFAULT_INGRESS


@dataclass(frozen=True)
class Scenario:
    label: str
    adapters: int  # distinct adapters in the traffic (0: none)


# "0_again" is no adapter once more, at another place in the round: its ratio to "0" is the
# bench's own noise in that run (an A/A comparison), beside which the adapters' ratios are read.
SCENARIOS = (Scenario("0", 0), Scenario("1", 1), Scenario("10", 10), Scenario("100", 100), Scenario("0_again", 0))
PROMPT = "a red circle on the left"
DEFAULT_IDLE_PAIRS = 40  # idle requests, each paired with a direct call (`--idle-pairs`)


def _start(base: str, registry_uri: str, workdir: Path, max_batch_images: int, ingress: str):
    from .serve_bench import start_bench_server

    return start_bench_server(base=base, registry=registry_uri, replicas=1, replica_num_cpus=2,
                              max_ongoing_requests=max_batch_images, max_queued_requests=256, ingress=ingress,
                              batching={"max_batch_images": max_batch_images},
                              cache={"disk_bytes": 0, "disk_dir": str(workdir / "cache"), "host_bytes": 4 * 1024**3})


class _Traffic:
    def __init__(self, url: str, steps: int, names: list[str]):
        import httpx

        self.http = httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=64))
        self.steps, self.names = steps, names
        self.seed = 0

    def one(self, adapter: int | None, prompt: str = PROMPT, seed: int | None = None, cache: bool = False) -> dict:
        if seed is None:
            self.seed += 1
            seed = self.seed
        body = {"prompt": prompt, "steps": self.steps, "seed": seed, "cache": cache}
        if adapter is not None:
            body["adapter"] = self.names[adapter]
        started = time.perf_counter()
        response = self.http.post("/v1/generate", json=body)
        client_ms = 1000 * (time.perf_counter() - started)
        response.raise_for_status()
        return {"client_ms": client_ms, "cache": response.headers.get("X-Cache"), **response.json()["timings"]}

    def burst(self, calls: list[tuple], concurrency: int) -> tuple[float, list[dict]]:
        """(seconds, per-request timings) of ``calls`` sent by ``concurrency`` clients."""
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            started = time.perf_counter()
            rows = list(pool.map(lambda call: self.one(*call), calls))
            return time.perf_counter() - started, rows


def round_bursts(scenarios: tuple[Scenario, ...], requests: int, round_index: int) -> list[tuple[str, list[tuple]]]:
    """One round's bursts, (label, calls): every scenario's ``requests`` in two halves, the
    scenarios in an order and then its mirror (reversed every other round). A drift in machine
    speed that is linear over the round then adds the same time to every scenario's two halves."""
    order = scenarios if round_index % 2 == 0 else scenarios[::-1]
    calls = {s.label: _scenario_calls(s.adapters, requests, round_index) for s in scenarios}
    half = requests // 2
    return [(s.label, calls[s.label][:half]) for s in order] + [(s.label, calls[s.label][half:]) for s in order[::-1]]


def _scenario_calls(adapters: int, requests: int, seed: int) -> list[tuple]:
    rng = random.Random(seed)
    if adapters == 0:
        return [(None,)] * requests
    return [(0 if adapters == 1 else rng.randrange(adapters),) for _ in range(requests)]


def _breakdown(rows: list[dict]) -> dict:
    """Median ms per stage, what HTTP (client minus server total) and Ray (the backend call minus
    the replica's own time) add, and the whole request path outside the pass (client minus pass)."""
    stages = sorted({stage for row in rows for stage in row["breakdown"]})
    out = {stage: round(statistics.median(row["breakdown"].get(stage, 0.0) for row in rows), 2) for stage in stages}
    out["pass"] = round(statistics.median(row["generation_ms"] for row in rows), 2)
    out["http_and_proxy"] = round(statistics.median(row["client_ms"] - row["total_ms"] for row in rows), 2)
    out["ray_handle"] = round(statistics.median(row["breakdown"]["backend"] - row["breakdown"]["replica"]
                                                for row in rows), 2)
    out["client_total"] = round(statistics.median(row["client_ms"] for row in rows), 2)
    out["outside_pass"] = round(statistics.median(row["client_ms"] - row["generation_ms"] for row in rows), 2)
    return out


def _images_per_pass(rows: list[dict]) -> float:
    """Mean images per pass, from one-image requests that each report their pass's size: a pass
    of b images is b rows of 1/b passes each."""
    return round(len(rows) / sum(1 / row["batch_images"] for row in rows), 2)


def _pass_ms_per_image(rows: list[dict]) -> float:
    """The passes' time over their images, from one-image requests that each report their pass's
    time and size: a pass of b images and g ms is b rows of g/b each. The pass's own cost per
    image, whatever the request path outside it adds."""
    return round(sum(row["generation_ms"] / row["batch_images"] for row in rows) / len(rows), 2)


def _zipf_calls(requests: int, repeat_share: float, seed: int) -> tuple[list[tuple], float]:
    """Prompts from a Zipf(1.1) law over a pool sized so that about ``repeat_share`` of requests
    repeat an earlier (prompt, seed); each prompt has one seed, so a repeat is the same request."""
    rng = random.Random(seed)
    best = None
    for pool in range(requests // 4, 20 * requests, max(1, requests // 8)):
        weights = [1 / (rank ** 1.1) for rank in range(1, pool + 1)]
        drawn = rng.choices(range(pool), weights=weights, k=requests)
        share = 1 - len(set(drawn)) / requests
        if best is None or abs(share - repeat_share) < abs(best[1] - repeat_share):
            best = (drawn, share)
    drawn, share = best
    return [(None, f"{PROMPT} {seed} {index}", 1000 + index) for index in drawn], share  # new prompts each round


def bench_http(base: str, steps: int, requests: int, rounds: int, workdir: Path, concurrency: int = 8,
               ingress: str = DEFAULT_INGRESS.value, idle_pairs: int = DEFAULT_IDLE_PAIRS) -> dict:
    from .ray_floor import measure_ray_floor
    from .serve_bench import DirectCall
    from .throughput_bench import _naive_rate, _Setup, _traffic

    setup = _Setup(base, max(s.adapters for s in SCENARIOS), steps, workdir)
    names = [f"{manifest.name}@{manifest.version}" for manifest in setup.manifests]
    direct = DirectCall(base, steps)
    direct_without_ray = direct.median_ms(5)
    naive = _naive_rate(setup, _traffic(100, min(requests, 16)))
    server = _start(base, setup.registry_uri, workdir, max_batch_images=concurrency, ingress=ingress)
    freeze_start_up_heap()  # this process's clients and direct calls meet no 0.4 s collection either
    try:
        traffic = _Traffic(server.url, steps, names)
        for index in range(8):  # warm-up: the base, and the first adapters, one request at a time
            traffic.one(None), traffic.one(index)
        # every adapter in the host tier, as in the in-process bench: the scenarios measure traffic
        # over adapters the replica holds, not their first fetch (the overhead section measures that)
        traffic.burst([(index,) for index in range(len(names))], concurrency)
        idle = _idle_pairs(traffic, direct, idle_pairs)
        floor = measure_ray_floor(server.url)
        rates: dict[str, list[float]] = {s.label: [] for s in SCENARIOS}
        loaded: dict[str, list[dict]] = {s.label: [] for s in SCENARIOS}
        cache_rates: dict[bool, list[float]] = {True: [], False: []}
        cache_rows: dict[bool, list[dict]] = {True: [], False: []}
        for round_index in range(rounds):
            seconds = dict.fromkeys(rates, 0.0)
            for label, calls in round_bursts(SCENARIOS, requests, round_index):
                elapsed, rows = traffic.burst(calls, concurrency)
                seconds[label] += elapsed
                loaded[label] += rows
            for label, spent in seconds.items():
                rates[label].append(requests / spent)
            calls, repeat_share = _zipf_calls(requests, 0.3, seed=round_index)
            for cached in (True, False):
                elapsed, rows = traffic.burst([(*call, cached) for call in calls], concurrency)
                cache_rates[cached].append(len(calls) / elapsed)
                cache_rows[cached] += rows
    finally:
        server.stop()
    return {**_report(base, steps, requests, rounds, concurrency, direct_without_ray, naive, idle,
                      rates, loaded, cache_rates, cache_rows, repeat_share), **floor}


def _idle_pairs(traffic: _Traffic, direct, pairs: int) -> list[dict]:
    """Idle requests, each paired with a direct pipeline call in this process made just before or
    just after it (alternately), so both meet the same machine (Ray Serve idle in the background);
    each row carries its pair's ``direct_ms``."""
    rows = []
    for index in range(pairs):
        if index % 2:
            row = traffic.one(None)
            rows.append({**row, "direct_ms": direct.ms()})
        else:
            direct_ms = direct.ms()
            rows.append({**traffic.one(None), "direct_ms": direct_ms})
    return rows


def _overhead(label: str, overhead_ms: float, direct_ms: float) -> dict:
    return {f"direct_{label}_ms": round(direct_ms, 1),
            f"http_idle_overhead_{label}_ms": round(overhead_ms, 1),
            f"http_idle_overhead_{label}_pct": round(100 * overhead_ms / direct_ms, 1)}


def _idle_overheads(idle: list[dict], without_ray: float) -> dict:
    """Beside Ray: the median of each pair's difference (a machine whose speed drifts moves both
    halves of a pair alike); before Ray: the idle p50 over the direct p50 measured then."""
    idle_p50 = statistics.median(row["client_ms"] for row in idle)
    beside = statistics.median(row["direct_ms"] for row in idle)
    paired = statistics.median(row["client_ms"] - row["direct_ms"] for row in idle)
    return {"http_idle_p50_ms": round(idle_p50, 1), "http_idle_pairs": len(idle),
            **_overhead("beside_ray", paired, beside), **_overhead("without_ray", idle_p50 - without_ray, without_ray),
            "ray_idle_slows_direct_pct": round(100 * (beside - without_ray) / without_ray, 1)}


def _ratio_within_rounds(rates: list[float], references: list[float]) -> float:
    """The median over rounds of each round's ratio: the machine's speed drifts between rounds."""
    return round(statistics.median(_round_ratios(rates, references)), 3)


def _round_ratios(rates: list[float], references: list[float]) -> list[float]:
    return [round(rate / reference, 3) for rate, reference in zip(rates, references)]


def _ratios_to_none(rates: dict[str, list[float]]) -> dict:
    """Each scenario's ratio to no adapter (median over rounds, and every round's)."""
    out = {}
    for label in rates.keys() - {"0"}:
        out[f"http_{label}_to_0"] = _ratio_within_rounds(rates[label], rates["0"])
        out[f"http_{label}_to_0_rounds"] = _round_ratios(rates[label], rates["0"])
    return dict(sorted(out.items()))


def _report(base, steps, requests, rounds, concurrency, direct_without_ray, naive, idle, rates, loaded, cache_rates,
            cache_rows, repeat_share) -> dict:
    """``direct_without_ray``: the direct call's p50 before Ray started."""
    median = {n: statistics.median(values) for n, values in rates.items()}
    result = {
        "base": base, "steps": steps, "http_requests_per_scenario": requests, "http_rounds": rounds,
        "http_concurrency": concurrency, **_idle_overheads(idle, direct_without_ray),
        **{f"http_{label}_images_per_s": round(median[label], 3) for label in rates},
        **{f"http_{label}_range": [round(min(rates[label]), 3), round(max(rates[label]), 3)] for label in rates},
        **_ratios_to_none(rates),
        "naive_100_images_per_s_in_process": round(naive, 3),
        "http_100_over_naive": round(median["100"] / naive, 2),
        "breakdown_idle_ms": _breakdown(idle),
        "breakdown_loaded_0_ms": _breakdown(loaded["0"]),
        "breakdown_loaded_100_ms": _breakdown(loaded["100"]),
        **{f"http_{label}_images_per_pass": _images_per_pass(rows) for label, rows in loaded.items()},
        **{f"http_{label}_pass_ms_per_image": _pass_ms_per_image(rows) for label, rows in loaded.items()},
        "cache_repeat_share": round(repeat_share, 3),
    }
    for cached in (True, False):
        label = "with_cache" if cached else "without_cache"
        result[f"cache_{label}_images_per_s"] = round(statistics.median(cache_rates[cached]), 3)
        result[f"cache_{label}_p50_ms"] = round(statistics.median(row["client_ms"] for row in cache_rows[cached]), 1)
    hits = sum(row["cache"] == "hit" for row in cache_rows[True])
    result["cache_hits_share"] = round(hits / len(cache_rows[True]), 3)
    return result
