"""`lorafleet demo`: the README's first command — the main job on the built-in default.

Publishes the built-in demo adapter to the local registry, starts the server on the built-in
base, generates an image with and without the adapter over HTTP, saves the PNGs and prints
where they are; then stops (or keeps serving with --keep-serving).
"""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path


def _publish_demo_adapter(registry, spec, seed: int):
    from lorafleet.demo import DEMO_ADAPTER_NAME, synthetic_lora
    from lorafleet.registry import PublishRequest

    payload = synthetic_lora(spec, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pytorch_lora_weights.safetensors"
        path.write_bytes(payload.to_bytes())
        request = PublishRequest(name=DEMO_ADAPTER_NAME, base=spec, aliases=["prod"],
                                 description="built-in demo adapter (synthetic LoRA)")
        return registry.publish(path, request)


def _generate(url: str, body: dict, out: Path) -> dict:
    import httpx

    response = httpx.post(f"{url}/v1/generate", json=body, timeout=300)
    response.raise_for_status()
    result = response.json()
    out.write_bytes(base64.b64decode(result["images"][0]))
    return result


def cmd_demo(args) -> int:
    from lorafleet.bases import base_spec
    from lorafleet.devtools.seaweed import free_port
    from lorafleet.registry import AdapterRegistry
    from lorafleet.serve.server import install_stop_handlers, start_server
    from lorafleet.serve.settings import load_settings

    registry = AdapterRegistry(args.registry)
    manifest = _publish_demo_adapter(registry, base_spec(args.base), args.seed)
    print(f"registry {registry.uri}: published {manifest.adapter_id} ({manifest.digest[:19]}...), "
          f"{manifest.name}:prod -> v{manifest.version}")
    settings = load_settings(base=args.base, registry=registry.uri, port=args.port or free_port())
    server = start_server(settings)
    print(f"server ready at {server.url}")
    try:
        out = Path(args.out).resolve()
        out.mkdir(parents=True, exist_ok=True)
        body = {"prompt": args.prompt, "seed": args.seed, "steps": args.steps}
        with_adapter = _generate(server.url, {**body, "adapter": f"{manifest.name}:prod"}, out / "demo-adapter.png")
        _generate(server.url, body, out / "demo-base.png")
        timings = with_adapter["timings"]
        print(f"generated with {manifest.name}:prod -> {out / 'demo-adapter.png'} "
              f"({timings['total_ms']:.0f} ms, replica {with_adapter['replica']})")
        print(f"generated with the base alone -> {out / 'demo-base.png'}")
        if args.keep_serving:
            print(f"serving at {server.url} until Ctrl-C", flush=True)
            install_stop_handlers().wait()
    finally:
        server.stop()
    return 0


def add_commands(subparsers) -> None:
    demo = subparsers.add_parser("demo", help="publish the demo adapter, serve it, and generate an image")
    demo.add_argument("--registry", help="registry URI (default $LORAFLEET_REGISTRY or ~/.lorafleet/registry)")
    demo.add_argument("--base", default="tiny")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--prompt", default="a red circle on the left")
    demo.add_argument("--port", type=int, help="HTTP port (default: a free one)")
    demo.add_argument("--out", default="lorafleet-demo", help="directory for the PNGs")
    demo.add_argument("--keep-serving", action="store_true", help="keep the server running after the demo")
    demo.set_defaults(handler=cmd_demo)
