"""`lorafleet demo`: the README's first command — the main job on the built-in default."""

from __future__ import annotations

import tempfile
from pathlib import Path


def cmd_demo(args) -> int:
    from lorafleet.bases import base_spec
    from lorafleet.demo import DEMO_ADAPTER_NAME, synthetic_lora
    from lorafleet.registry import AdapterRegistry, PublishRequest
    from lorafleet.registry.cli import _manifest_line, _manifest_text

    registry = AdapterRegistry(args.registry)
    spec = base_spec(args.base)
    payload = synthetic_lora(spec, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pytorch_lora_weights.safetensors"
        path.write_bytes(payload.to_bytes())
        request = PublishRequest(name=DEMO_ADAPTER_NAME, base=spec, aliases=["prod"],
                                 description="built-in demo adapter (synthetic LoRA)")
        manifest = registry.publish(path, request)
    print(f"registry: {registry.uri}")
    print(f"published {manifest.adapter_id} and moved {DEMO_ADAPTER_NAME}:prod to it\n")
    print("$ lorafleet registry list")
    print("\n".join(_manifest_line(m) for m in registry.list()))
    print(f"\n$ lorafleet registry show {DEMO_ADAPTER_NAME}:prod")
    print(_manifest_text(registry.resolve(f"{DEMO_ADAPTER_NAME}:prod")))
    return 0


def add_commands(subparsers) -> None:
    demo = subparsers.add_parser("demo", help="publish the built-in demo adapter and show it")
    demo.add_argument("--registry", help="registry URI (default $LORAFLEET_REGISTRY or ~/.lorafleet/registry)")
    demo.add_argument("--base", default="tiny")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=cmd_demo)
