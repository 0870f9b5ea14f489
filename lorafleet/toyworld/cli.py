"""`lorafleet base train-toy`: train the `toy` base on the procedural shapes world (CPU).

It lives with the toy world rather than with the bases: it draws, trains and scores with it."""

from __future__ import annotations

# Imports inside functions: building the command-line parser must not import torch, diffusers or
# Ray (`lorafleet --help` takes 0.3 s).
import json
import sys
from dataclasses import asdict
from pathlib import Path


def cmd_train_toy(args) -> int:
    # Local: building the parser must not import torch (`lorafleet --help` stays fast).
    from lorafleet.bases import load_base
    from lorafleet.bases.catalog import TOY_DIRECTORY

    from .base_model import TOY_IMAGE_SIZE, ToyRecipe, base_targets, held_out_targets, train_toy_base
    from .evaluate import concept_accuracy

    if args.resolution != TOY_IMAGE_SIZE and not args.out:
        print(f"error: --resolution {args.resolution} needs --out: the packaged toy base is {TOY_IMAGE_SIZE} px",
              file=sys.stderr)
        return 2
    recipe = ToyRecipe(seed=args.seed, vae_steps=args.vae_steps, unet_steps=args.unet_steps, threads=args.threads,
                       image_size=args.resolution)
    output = Path(args.out) if args.out else TOY_DIRECTORY
    report = train_toy_base(output, recipe, log=lambda line: print(line, flush=True),
                            vae_from=Path(args.vae_from) if args.vae_from else None)
    if args.evaluate:
        pipe = load_base(str(output)).pipeline
        seeds = list(range(args.eval_seeds))
        report["base_concepts"] = asdict(concept_accuracy(pipe, base_targets(), seeds))
        report["held_out"] = {kind: asdict(concept_accuracy(pipe, targets, seeds))
                              for kind, targets in held_out_targets().items()}
    (output / "training_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


def add_commands(base_commands) -> None:
    toy = base_commands.add_parser("train-toy", help="train the `toy` base on the procedural shapes world (CPU)")
    toy.add_argument("--out", help="diffusers directory to write (default: the packaged toy base)")
    toy.add_argument("--seed", type=int, default=20261124)
    toy.add_argument("--vae-steps", type=int, default=1200)
    toy.add_argument("--unet-steps", type=int, default=2000)
    toy.add_argument("--vae-from", help="a VAE directory from an earlier run of this recipe (skips stage 2)")
    toy.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    toy.add_argument("--resolution", type=int, default=32, choices=(32, 64),
                     help="image side in pixels (the committed base is 32; 64 gives the UNet 16x16 latents)")
    toy.add_argument("--no-evaluate", dest="evaluate", action="store_false", help="skip scoring generated images")
    toy.add_argument("--eval-seeds", type=int, default=8, help="images per prompt when evaluating")
    toy.set_defaults(handler=cmd_train_toy)
