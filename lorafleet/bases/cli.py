"""`lorafleet base ...`: export and inspect base models."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def cmd_export(args) -> int:
    from . import export_base, load_base
    from .single_file import export_single_file

    if args.format == "single-file":
        loaded = load_base(args.base)
        export_single_file(loaded.pipeline, Path(args.dest))
    else:
        loaded = export_base(args.base, Path(args.dest))
    info = {"base": loaded.id, "fingerprint": loaded.fingerprint, "path": str(Path(args.dest).resolve()),
            "format": args.format}
    print(json.dumps(info, indent=2) if args.json else f"exported {loaded.id} to {info['path']}\n"
          f"fingerprint {loaded.fingerprint}")
    return 0


def cmd_fingerprint(args) -> int:
    from . import load_base

    loaded = load_base(args.base, base_config=args.base_config)
    print(json.dumps({"base": loaded.id, "fingerprint": loaded.fingerprint}) if args.json else loaded.fingerprint)
    return 0


def cmd_train_toy(args) -> int:
    from dataclasses import asdict

    from lorafleet.bases.catalog import TOY_DIRECTORY
    from lorafleet.toyworld.base_model import TOY_IMAGE_SIZE, ToyRecipe, base_targets, held_out_targets, train_toy_base
    from lorafleet.toyworld.evaluate import concept_accuracy

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
        from . import load_base

        pipe = load_base(str(output)).pipeline
        seeds = list(range(args.eval_seeds))
        report["base_concepts"] = asdict(concept_accuracy(pipe, base_targets(), seeds))
        report["held_out"] = {kind: asdict(concept_accuracy(pipe, targets, seeds))
                              for kind, targets in held_out_targets().items()}
    (output / "training_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser("base", help="built-in and local base models")
    commands = parser.add_subparsers(dest="base_command", required=True)
    export = commands.add_parser("export", help="write a base as a diffusers directory")
    export.add_argument("base", help="built-in base name (tiny) or a diffusers directory")
    export.add_argument("dest", help="a directory (diffusers) or a .safetensors file (single-file)")
    export.add_argument("--format", default="diffusers", choices=["diffusers", "single-file"],
                        help="diffusers directory, or one original-layout (LDM/A1111) checkpoint")
    export.add_argument("--json", action="store_true")
    export.set_defaults(handler=cmd_export)
    fingerprint = commands.add_parser("fingerprint", help="print a base's fingerprint")
    fingerprint.add_argument("base")
    fingerprint.add_argument("--base-config", help="diffusers directory with the configs of a single-file checkpoint")
    fingerprint.add_argument("--json", action="store_true")
    fingerprint.set_defaults(handler=cmd_fingerprint)
    toy = commands.add_parser("train-toy", help="train the `toy` base on the procedural shapes world (CPU)")
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
