"""`lorafleet base ...`: export and inspect base models."""

from __future__ import annotations

# Imports inside functions: building the command-line parser must not import torch, diffusers or
# Ray (`lorafleet --help` takes 0.3 s).
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
    info = {"base": loaded.id, "family": loaded.family.name, "fingerprint": loaded.fingerprint,
            "path": str(Path(args.dest).resolve()), "format": args.format}
    print(json.dumps(info, indent=2) if args.json else f"exported {loaded.id} ({loaded.family.title}) to "
          f"{info['path']}\nfingerprint {loaded.fingerprint}")
    return 0


def cmd_fingerprint(args) -> int:
    from . import load_base

    loaded = load_base(args.base, base_config=args.base_config)
    info = {"base": loaded.id, "family": loaded.family.name, "fingerprint": loaded.fingerprint}
    print(json.dumps(info) if args.json else loaded.fingerprint)
    if not args.json:
        print(f"family {loaded.family.name} ({loaded.family.title})", file=sys.stderr)
    return 0


def add_commands(subparsers):
    """Adds `lorafleet base ...`; returns its subcommands, so that higher layers can add theirs."""
    parser = subparsers.add_parser("base", help="built-in and local base models")
    commands = parser.add_subparsers(dest="base_command", required=True)
    export = commands.add_parser("export", help="write a base as a diffusers directory")
    export.add_argument("base", help="built-in base name (tiny) or a diffusers directory")
    export.add_argument("dest", help="a directory (diffusers) or a .safetensors file (single-file)")
    export.add_argument("--format", default="diffusers", choices=["diffusers", "single-file"],
                        help="diffusers directory, or one original-layout checkpoint (LDM/A1111; Flux: the "
                        "transformer in BFL's layout, loaded with --base-config DIR)")
    export.add_argument("--json", action="store_true")
    export.set_defaults(handler=cmd_export)
    fingerprint = commands.add_parser("fingerprint", help="print a base's fingerprint")
    fingerprint.add_argument("base")
    fingerprint.add_argument("--base-config", help="diffusers directory with the configs of a single-file checkpoint")
    fingerprint.add_argument("--json", action="store_true")
    fingerprint.set_defaults(handler=cmd_fingerprint)
    return commands
