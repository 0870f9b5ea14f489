"""The `lorafleet` command. Each domain adds its own commands; errors are printed here."""

from __future__ import annotations

# Imports inside functions: building the command-line parser must not import torch, diffusers or
# Ray (`lorafleet --help` takes 0.3 s).
import argparse
import json
import logging
import os
import sys

from lorafleet.errors import LorafleetError

EXIT_USAGE = 2
EXIT_DOMAIN_ERROR = 1


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def build_parser() -> argparse.ArgumentParser:
    from lorafleet import benchmarks, demo_cli
    from lorafleet.bases import cli as bases_cli
    from lorafleet.evaluation import cli as evaluation_cli
    from lorafleet.registry import cli as registry_cli
    from lorafleet.serve import cli as serve_cli
    from lorafleet.toyworld import cli as toyworld_cli
    from lorafleet.training import cli as training_cli

    parser = argparse.ArgumentParser(
        prog="lorafleet",
        description="Train, register and serve LoRA adapters on one frozen diffusion base model.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    demo_cli.add_commands(subparsers)
    registry_cli.add_commands(subparsers)
    serve_cli.add_commands(subparsers)
    training_cli.add_commands(subparsers)
    toyworld_cli.add_commands(bases_cli.add_commands(subparsers))
    benchmarks.add_commands(subparsers)
    evaluation_cli.add_commands(subparsers)
    return parser


# `PARENT CHILD ...` forms whose parent keeps its own positional arguments: routed to PARENT-CHILD.
ROUTED = {"train": ("submit", "status", "list", "cancel"), "eval": ("audit",), "registry": ("promote",)}


def routed(argv: list[str]) -> list[str]:
    if len(argv) >= 2 and argv[1] in ROUTED.get(argv[0], ()):
        return [f"{argv[0]}-{argv[1]}", *argv[2:]]
    return argv


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    args = build_parser().parse_args(routed(list(sys.argv[1:] if argv is None else argv)))
    try:
        return int(args.handler(args) or 0)
    except LorafleetError as exc:
        if getattr(args, "json", False):
            print(json.dumps({"error": exc.to_dict()}, indent=2))
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DOMAIN_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `lorafleet ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
