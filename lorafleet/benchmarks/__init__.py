"""`lorafleet bench ...`: benchmarks are commands that print numbers (a table, then JSON)."""

from __future__ import annotations

# Imports inside functions: every benchmark's arguments are added when the parser is built; its
# heavy imports wait for its run.
import argparse
import multiprocessing


def positive_int(text: str) -> int:
    """argparse type for counts (requests, steps, repeats...): a clear error instead of a crash later."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def in_fresh_process(target, *args) -> dict:
    """``target(*args, queue)`` in a spawned process; what it put on the queue. A run's threads and
    memory are its own (a torch thread left alive by an earlier run slows OpenMP in later ones)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get(timeout=3600)
    process.join()
    return result


def add_commands(subparsers) -> None:
    from . import (
        autoscale_bench,
        concepts_bench,
        eval_bench,
        multiteam_bench,
        registry_bench,
        reliability_report,
        serve_bench,
        train_bench,
        trainings_bench,
    )

    parser = subparsers.add_parser("bench", help="benchmarks (print a table and JSON)")
    benches = parser.add_subparsers(dest="bench_command", required=True)
    registry_bench.add_arguments(benches.add_parser("registry", help="registry publish/pull/list on file and S3"))
    serve_bench.add_arguments(benches.add_parser("serve", help="serving overhead, tier costs, naive-loop comparison"))
    train_bench.add_arguments(benches.add_parser("train", help="training speed/memory vs a plain diffusers loop"))
    trainings_bench.add_arguments(benches.add_parser(
        "trainings", help="data to first served image: the training service's API vs the CLI (toy)"))
    multiteam_bench.add_arguments(benches.add_parser(
        "multiteam", help="tenants' fairness under a flood, a canary split's share, pre-warm vs cold (tiny)"))
    autoscale_bench.add_arguments(benches.add_parser("autoscale", help="Ray Serve autoscaling under a burst"))
    reliability_report.add_arguments(benches.add_parser(
        "reliability", help="run the reliability tests and write docs/reliability.md (--soak: longer)"))
    eval_bench.add_arguments(benches.add_parser(
        "eval", help="the bias audit's correction on toy (before/after) and an eval's wall time through a server"))
    concepts_bench.add_arguments(benches.add_parser(
        "concepts", help="concept learning per training method on the toy base (held-out colour and shape)"))
