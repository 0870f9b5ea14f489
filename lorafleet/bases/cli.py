"""`lorafleet base ...`: export and inspect base models."""

from __future__ import annotations

import json
from pathlib import Path


def cmd_export(args) -> int:
    from . import export_base

    loaded = export_base(args.base, Path(args.dest))
    info = {"base": loaded.id, "fingerprint": loaded.fingerprint, "path": str(Path(args.dest).resolve())}
    print(json.dumps(info, indent=2) if args.json else f"exported {loaded.id} to {info['path']}\n"
          f"fingerprint {loaded.fingerprint}")
    return 0


def cmd_fingerprint(args) -> int:
    from . import load_base

    loaded = load_base(args.base)
    print(json.dumps({"base": loaded.id, "fingerprint": loaded.fingerprint}) if args.json else loaded.fingerprint)
    return 0


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser("base", help="built-in and local base models")
    commands = parser.add_subparsers(dest="base_command", required=True)
    export = commands.add_parser("export", help="write a base as a diffusers directory")
    export.add_argument("base", help="built-in base name (tiny) or a diffusers directory")
    export.add_argument("dest")
    export.add_argument("--json", action="store_true")
    export.set_defaults(handler=cmd_export)
    fingerprint = commands.add_parser("fingerprint", help="print a base's fingerprint")
    fingerprint.add_argument("base")
    fingerprint.add_argument("--json", action="store_true")
    fingerprint.set_defaults(handler=cmd_fingerprint)
