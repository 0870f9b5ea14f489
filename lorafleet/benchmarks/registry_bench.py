"""`lorafleet bench registry`: publish/pull throughput and list latency on every backend.

Publishes N adapters of about S MB each through the full publish path (read, convert,
validate, digest, store), pulls them back (verified download), then measures `list NAME`
and `resolve NAME` on a name with V versions. The S3 backend is a SeaweedFS server started
on loopback for the run.
"""

from __future__ import annotations

# Imports inside functions: every benchmark's arguments are added when the parser is built; its
# heavy imports wait for its run.
import json
import os
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from lorafleet.text_table import format_table

from . import positive_int

BIG_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")


REGISTRY_COLUMNS = ["backend", "adapters", "adapter_mb", "publish_adapters_per_s", "publish_mb_per_s",
                    "pull_adapters_per_s", "pull_mb_per_s", "versions", "list_ms_median", "resolve_latest_ms_median"]


def _rank_for_size(spec, size_mb: float) -> int:
    """The LoRA rank that makes a synthetic adapter about ``size_mb`` MB (fp32)."""
    from lorafleet.synthetic import synthetic_lora

    one = synthetic_lora(spec, rank=1, targets=BIG_TARGETS)
    return max(1, round(size_mb * 1e6 / (one.num_parameters * 4)))


def _write_sources(directory: Path, spec, count: int, rank: int) -> list[Path]:
    from lorafleet.synthetic import synthetic_lora

    paths = []
    for index in range(count):
        path = directory / f"adapter-{index}.safetensors"
        path.write_bytes(synthetic_lora(spec, seed=index, rank=rank, alpha=rank, targets=BIG_TARGETS).to_bytes())
        paths.append(path)
    return paths


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _bench_backend(uri: str, spec, sources: list[Path], versions: int, workdir: Path) -> dict:
    from lorafleet.registry import AdapterRegistry, PublishRequest
    from lorafleet.synthetic import synthetic_lora

    registry = AdapterRegistry(uri)
    total_mb = sum(p.stat().st_size for p in sources) / 1e6
    names = [f"bench-{i}" for i in range(len(sources))]
    publish_s = _timed(lambda: [registry.publish(p, PublishRequest(name=n, base=spec)) for p, n in zip(sources, names)])
    pull_s = _timed(lambda: [registry.pull(n, workdir / "pulled") for n in names])
    small = synthetic_lora(spec, seed=0)
    many_s = _timed(lambda: [registry.publish_payload(small, PublishRequest(name="many", base=spec))
                             for _ in range(versions)])
    list_ms = [1000 * _timed(lambda: registry.list("many")) for _ in range(5)]
    resolve_ms = [1000 * _timed(lambda: registry.resolve("many")) for _ in range(5)]
    return {
        "backend": uri.split("://", 1)[0],
        "adapters": len(sources),
        "adapter_mb": round(total_mb / len(sources), 2),
        "publish_adapters_per_s": round(len(sources) / publish_s, 2),
        "publish_mb_per_s": round(total_mb / publish_s, 1),
        "pull_adapters_per_s": round(len(sources) / pull_s, 2),
        "pull_mb_per_s": round(total_mb / pull_s, 1),
        "versions": versions,
        "publish_small_versions_per_s": round(versions / many_s, 1),
        "list_ms_median": round(statistics.median(list_ms), 1),
        "resolve_latest_ms_median": round(statistics.median(resolve_ms), 1),
    }


def run_registry_bench(adapters: int = 100, size_mb: float = 3.0, versions: int = 1000,
                       backends: tuple[str, ...] = ("file", "s3")) -> list[dict]:
    from lorafleet.bases import base_spec

    spec = base_spec("tiny")
    results = []
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lorafleet-bench-")))
        (workdir / "src").mkdir()
        sources = _write_sources(workdir / "src", spec, adapters, _rank_for_size(spec, size_mb))
        for backend in backends:
            results.append(_bench_backend(_backend_uri(backend, stack, workdir), spec, sources, versions, workdir))
    return results


def _backend_uri(backend: str, stack: ExitStack, workdir: Path) -> str:
    if backend == "file":
        return f"file://{workdir / 'registry'}"
    if backend == "s3":
        from lorafleet.devtools.seaweed import start_seaweed

        server = stack.enter_context(start_seaweed(workdir / "seaweed"))
        os.environ.update(server.env())
        server.create_bucket("bench")
        return "s3://bench/registry"
    raise ValueError(f"unknown backend {backend!r}")


def emit(results: list[dict], columns: list[str] | None = None, transpose: bool = False) -> int:
    """What every benchmark prints: a table, then the same figures as JSON."""
    print(format_table(results, columns, transpose))
    print(json.dumps(results, indent=2))
    return 0


def cmd_bench_registry(args) -> int:
    results = run_registry_bench(args.adapters, args.size_mb, args.versions, tuple(args.backends.split(",")))
    return emit(results, REGISTRY_COLUMNS)


def add_arguments(parser) -> None:
    parser.add_argument("--adapters", type=positive_int, default=100)
    parser.add_argument("--size-mb", type=float, default=3.0)
    parser.add_argument("--versions", type=positive_int, default=1000)
    parser.add_argument("--backends", default="file,s3")
    parser.set_defaults(handler=cmd_bench_registry)
