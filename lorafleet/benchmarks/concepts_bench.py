"""`lorafleet bench concepts`: how well each training method teaches the `toy` base a held-out concept.

For each method and concept: train on 16 images with a trigger word, publish, serve, generate
(8 seeds per prompt) and score. Prints accuracy without/with the adapter, how much of the base's
own accuracy survives with it loaded, and how far it moves the hue of the base's own prompts
(degrees between mean foreground hues without and with it: mean and worst over the 20 pairings).
With --compose: a colour adapter and a shape adapter, trained apart with their own trigger words,
named together in one request.
"""

from __future__ import annotations

# Imports inside functions: every benchmark's arguments are added when the parser is built; its
# heavy imports wait for its run.
import tempfile
from pathlib import Path

from . import in_fresh_process, positive_int
from .registry_bench import emit

COLUMNS = ["method", "concept", "images", "train_s", "without", "with", "base_without", "base_with", "retained",
           "drift_mean_deg", "drift_max_deg"]


def run_concepts(methods: list[str], concepts: list[str], seeds: int, base: str = "toy",
                 grids: Path | None = None) -> list[dict]:
    """Each method and concept in a fresh process: a run's training seconds are not slowed by the
    threads and memory earlier runs left (measured: DreamBooth 127 s after three runs, 42 s alone)."""
    results = []
    for concept in concepts:
        for method in methods:
            results.append(in_fresh_process(_concept_row, method, concept, seeds, base, grids))
            print(results[-1], flush=True)
    return results


def _concept_row(method: str, concept: str, seeds: int, base: str, grids: Path | None, queue) -> None:
    from lorafleet.toyworld.concepts import learn_concept
    from lorafleet.training.reporting import save_grid

    with tempfile.TemporaryDirectory() as workdir:
        r = learn_concept(method, Path(workdir), concept, seeds=seeds, base=base)
    if grids is not None:  # rows = the concept's prompts, columns = seeds, drawn with the adapter
        save_grid(list(r.samples.values()), grids / f"{concept}-{method}.png", scale=2)
    queue.put({"method": method, "concept": concept, "images": r.images, "train_s": r.train_seconds,
               "without": round(r.target_without, 3), "with": round(r.target_with, 3),
               "base_without": round(r.base_without, 3), "base_with": round(r.base_with, 3),
               "retained": round(r.retained, 3), "drift_mean_deg": round(r.hue_drift_mean, 1),
               "drift_max_deg": round(r.hue_drift_max, 1)})


def run_composition(methods: list[str], seeds: int, base: str = "toy") -> list[dict]:
    from lorafleet.toyworld.concepts import compose_concepts

    results = []
    for method in methods:
        with tempfile.TemporaryDirectory() as workdir:
            results.append({k: round(v, 3) if isinstance(v, float) else v
                            for k, v in compose_concepts(method, Path(workdir), seeds, base).items()})
        print(results[-1], flush=True)
    return results


def cmd_bench_concepts(args) -> int:
    if args.compose:
        return emit(run_composition(args.methods.split(","), args.seeds, args.base))
    grids = Path(args.grids) if args.grids else None
    return emit(run_concepts(args.methods.split(","), args.concepts.split(","), args.seeds, args.base, grids),
                COLUMNS)


def add_arguments(parser) -> None:
    parser.add_argument("--methods", default="lora,dreambooth,qlora,textual_inversion,full")
    parser.add_argument("--concepts", default="colour,shape", help="held-out colour (cyan) and/or shape (star)")
    parser.add_argument("--base", default="toy",
                        help="toy, or a toy-world base trained by `lorafleet base train-toy --out DIR`")
    parser.add_argument("--seeds", type=positive_int, default=8, help="images per prompt")
    parser.add_argument("--grids", metavar="DIR",
                        help="save each method's images for the concept's prompts as DIR/<concept>-<method>.png")
    parser.add_argument("--compose", action="store_true",
                        help="train a colour and a shape adapter per method and name both in one request")
    parser.set_defaults(handler=cmd_bench_concepts)
