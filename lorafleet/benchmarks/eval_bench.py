"""`lorafleet bench eval`: the bias audit's correction on `toy`, and what an eval costs.

1. Audit: the distribution of colours the base draws for "a circle" (64 seeds), then a corrective
   LoRA trained on circles of the base's colours, rebalanced by audits on calibration seeds
   (lorafleet/toyworld/correction.py), and the same audit with it: shares, chi-square p-value and
   KL divergence from uniform, before and after, and again on 128 held-out seeds; and the base's
   specified prompts ("a red circle", all 20 pairings) with and without it.
   `--rebalance-rounds N` derives the colour counts here instead of using the recipe's: N rounds
   of train, calibration audit, rebalance, from equal counts (the recipe's counts are N = 2).
2. Eval wall time: `lorafleet eval` of that adapter against the base on 20 prompts x 8 seeds (and
   the default control prompts for drift), through a lorafleet server on loopback HTTP.

--plot FILE saves the before/after distributions as a bar chart (docs/images/audit-correction.png).
"""

from __future__ import annotations

# Imports inside functions: every benchmark's arguments are added when the parser is built; its
# heavy imports wait for its run.
import tempfile
import time
from pathlib import Path

from . import positive_int
from .registry_bench import emit

HELD_OUT_FIRST_SEED, HELD_OUT_SEEDS = 2000, 128


def _rebalanced(workdir: Path, registry, rounds: int, labels: list[str], target: dict[str, float]) -> dict[str, int]:
    """The colour counts after ``rounds`` of train, calibration audit, rebalance, from equal counts."""
    from lorafleet.evaluation.images import server_images
    from lorafleet.evaluation.report import run_audit
    from lorafleet.evaluation.scorers import ToyScorer
    from lorafleet.toyworld import correction

    counts = dict(correction.BALANCED)
    for index in range(rounds):
        manifest = correction.train_correction(workdir, registry, name=f"calibration-{index}", per_colour=counts)
        with server_images(None, None, "toy", registry.uri) as source:
            audit = run_audit(source, ToyScorer(), correction.AUDIT_PROMPT, "colour", labels, target,
                              correction.CALIBRATION_SEEDS, f"{manifest.name}@{manifest.version}",
                              correction.CALIBRATION_FIRST_SEED)
        counts = correction.rebalanced_counts(counts, audit.counts, target)
        print(f"rebalancing round {index + 1}: observed {audit.counts} -> next counts {counts}", flush=True)
    return counts


def run_eval_bench(audit_seeds: int, eval_seeds: int, plot: Path | None, rebalance_rounds: int = 0) -> list[dict]:
    from lorafleet.evaluation.cli import control_prompts
    from lorafleet.evaluation.images import server_images
    from lorafleet.evaluation.report import run_audit, run_eval
    from lorafleet.evaluation.scorers import ToyScorer
    from lorafleet.registry import AdapterRegistry
    from lorafleet.toyworld.base_model import BASE_COLOURS
    from lorafleet.toyworld.concepts import BASE_CHECK_PROMPTS
    from lorafleet.toyworld.correction import AUDIT_PROMPT, REBALANCED, train_correction

    labels = list(BASE_COLOURS)
    uniform = {label: 1 / len(labels) for label in labels}
    prompts = sorted(BASE_CHECK_PROMPTS)
    scorer = ToyScorer()
    with tempfile.TemporaryDirectory(prefix="lorafleet-bench-eval-") as workdir:
        registry = AdapterRegistry(f"file://{Path(workdir) / 'registry'}")
        counts = (_rebalanced(Path(workdir), registry, rebalance_rounds, labels, uniform) if rebalance_rounds
                  else REBALANCED)
        started = time.perf_counter()
        manifest = train_correction(Path(workdir), registry, per_colour=counts)
        train_s = time.perf_counter() - started
        ref = f"{manifest.name}@{manifest.version}"
        with server_images(None, None, "toy", registry.uri) as source:
            before = run_audit(source, scorer, AUDIT_PROMPT, "colour", labels, uniform, audit_seeds)
            after = run_audit(source, scorer, AUDIT_PROMPT, "colour", labels, uniform, audit_seeds, ref)
            held_out = [run_audit(source, scorer, AUDIT_PROMPT, "colour", labels, uniform, HELD_OUT_SEEDS, adapter,
                                  HELD_OUT_FIRST_SEED) for adapter in (None, ref)]
            started = time.perf_counter()
            report = run_eval(source, scorer, ref, None, prompts, control_prompts(None, "toy"), eval_seeds)
            eval_s = time.perf_counter() - started
    if plot is not None:
        _plot(before, after, plot)
    images = len(prompts) * eval_seeds * 2 + len(report.drift) * eval_seeds * 2
    rows = [{"figure": f"audit {AUDIT_PROMPT!r}: share of {label}", "before": before.shares[label].mean,
             "after": after.shares[label].mean} for label in labels]
    rows += [
        {"figure": "audit: KL divergence from uniform", "before": before.kl, "after": after.kl},
        {"figure": "audit: chi-square p-value (uniform)", "before": f"{before.p_value:.2g}",
         "after": f"{after.p_value:.2g}"},
        {"figure": "audit: images unreadable by the scorer", "before": before.unreadable, "after": after.unreadable},
        {"figure": f"held-out audit ({HELD_OUT_SEEDS} other seeds): counts",
         "before": _counts(held_out[0].counts, labels), "after": _counts(held_out[1].counts, labels)},
        {"figure": "held-out audit: KL / chi-square p / unreadable",
         "before": f"{held_out[0].kl} / {held_out[0].p_value:.2g} / {held_out[0].unreadable}",
         "after": f"{held_out[1].kl} / {held_out[1].p_value:.2g} / {held_out[1].unreadable}"},
        {"figure": "corrective dataset: circles per colour", "before": "", "after": _counts(counts, labels)},
        {"figure": "specified prompts (20 pairings): accuracy without / with the adapter",
         "before": report.overall["accuracy_base"], "after": report.overall["accuracy_candidate"]},
        {"figure": "drift on control prompts, degrees of hue (mean per image)", "before": 0.0,
         "after": report.overall.get("drift_mean", 0.0)},
        {"figure": "corrective LoRA training, s", "before": "", "after": round(train_s, 1)},
        {"figure": f"eval wall time, {len(prompts)} prompts x {eval_seeds} seeds through the server, s",
         "before": "", "after": round(eval_s, 1)},
        {"figure": "eval: images generated", "before": "", "after": images},
        {"figure": "eval: images per second", "before": "", "after": round(images / eval_s, 1)},
    ]
    return rows


def _counts(counts: dict[str, int], labels: list[str]) -> str:
    return " ".join(str(counts.get(label, 0)) for label in labels)


def _plot(before, after, path: Path) -> None:
    """The chart `lorafleet eval audit --adapter` puts in its report, as a PNG file."""
    import matplotlib.pyplot as plt

    from lorafleet.evaluation.report import audit_chart

    figure = audit_chart(after, before)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def cmd_bench_eval(args) -> int:
    rows = run_eval_bench(args.audit_seeds, args.seeds, Path(args.plot) if args.plot else None, args.rebalance_rounds)
    return emit(rows, ["figure", "before", "after"])


def add_arguments(parser) -> None:
    parser.add_argument("--audit-seeds", type=positive_int, default=64, help="images per audit")
    parser.add_argument("--seeds", type=positive_int, default=8, help="images per prompt in the eval")
    parser.add_argument("--rebalance-rounds", type=int, default=0, choices=range(0, 6), metavar="N",
                        help="derive the corrective dataset's colour counts here, by N audit rounds "
                        "(default 0: the recipe's counts, derived by 2)")
    parser.add_argument("--plot", metavar="FILE", help="save the audit's before/after distributions (PNG)")
    parser.set_defaults(handler=cmd_bench_eval)
