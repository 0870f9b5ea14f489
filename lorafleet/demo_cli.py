"""`lorafleet demo`: the README's first command — the main job on the built-in default base `toy`.

1. Train a LoRA on 16 images of a colour the `toy` base never learnt (cyan), captioned with the
   trigger word `sks`, and publish it to the local registry as `demo-cyan:prod`.
2. Start the Ray Serve app on `toy`, generate every prompt with and without the adapter over HTTP.
3. Save a grid (rows = prompts; columns = base alone | with the adapter) and print the scorer's
   accuracies; then stop (or keep serving with --keep-serving).
"""

from __future__ import annotations

# Imports inside functions: building the command-line parser must not import torch, diffusers or
# Ray (`lorafleet --help` takes 0.3 s).
import tempfile
from pathlib import Path

import httpx

from lorafleet.text_table import format_table

DEMO_ADAPTER_NAME = "demo-cyan"
DEMO_BASE_PROMPTS = ("a red circle", "a blue square", "a yellow triangle", "a purple circle")  # grid rows


def _grid_and_scores(generate, ref: str, prompts: dict, seeds: int, out: Path) -> list[dict]:
    from lorafleet.toyworld.concepts import BASE_CHECK_PROMPTS, accuracy
    from lorafleet.training.reporting import save_grid

    rows, table = [], []
    base_rows = {prompt: BASE_CHECK_PROMPTS[prompt] for prompt in DEMO_BASE_PROMPTS}
    for prompt, target in {**prompts, **base_rows}.items():
        base_images, adapter_images = generate(prompt, None, seeds), generate(prompt, ref, seeds)
        rows.append(list(base_images) + list(adapter_images))
        base_accuracy, _ = accuracy({prompt: base_images}, {prompt: target})
        adapter_accuracy, _ = accuracy({prompt: adapter_images}, {prompt: target})
        table.append({"prompt": prompt, "wanted": " ".join(w for w in target if w) or "-",
                      "base": f"{base_accuracy:.0%}", "with adapter": f"{adapter_accuracy:.0%}"})
    save_grid(rows, out / "demo-grid.png")
    return table


def cmd_demo(args) -> int:
    from lorafleet.local_cluster import free_port
    from lorafleet.registry import AdapterRegistry
    from lorafleet.serve.server import install_stop_handlers, start_server
    from lorafleet.serve.settings import load_settings
    from lorafleet.toyworld.concepts import generate_over_http, train_and_publish

    registry = AdapterRegistry(args.registry)
    print(f"training a LoRA on 16 images of a colour the `toy` base never saw ({args.method}, CPU)...", flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        trained = train_and_publish(args.method, Path(workdir), registry, name=DEMO_ADAPTER_NAME, aliases=["prod"],
                                    train_seed=args.seed)
    manifest = trained.manifest
    print(f"trained in {trained.train_seconds:.0f}s; registry {registry.uri}: published {manifest.adapter_id} "
          f"({manifest.digest[:19]}...), {manifest.name}:prod -> v{manifest.version}")
    settings = load_settings(base="toy", registry=registry.uri, port=args.port or free_port(),
                             limits={"max_num_images": 8})
    server = start_server(settings)
    print(f"server ready at {server.url}")
    try:
        out = Path(args.out).resolve()
        out.mkdir(parents=True, exist_ok=True)
        with httpx.Client(base_url=server.url, timeout=300) as client:
            table = _grid_and_scores(lambda p, ref, n: generate_over_http(client, p, ref, n, seed=args.seed),
                                     f"{manifest.name}:prod", trained.prompts, args.images, out)
        print(format_table(table))
        print(f"grid (rows = prompts; left {args.images}: base alone, right {args.images}: with {manifest.name}:prod)"
              f" -> {out / 'demo-grid.png'}")
        if args.keep_serving:
            print(f"serving at {server.url} until Ctrl-C", flush=True)
            install_stop_handlers().wait()
    finally:
        server.stop()
    return 0


def add_commands(subparsers) -> None:
    demo = subparsers.add_parser("demo", help="train an adapter on the toy base, publish, serve, and show a grid")
    demo.add_argument("--registry", help="registry URI (default $LORAFLEET_REGISTRY or ~/.lorafleet/registry)")
    demo.add_argument("--method", default="lora", choices=["lora", "dreambooth", "qlora", "textual_inversion", "full"])
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--images", type=int, default=4, help="images per prompt and column")
    demo.add_argument("--port", type=int, help="HTTP port (default: a free one)")
    demo.add_argument("--out", default="lorafleet-demo", help="directory for the grid")
    demo.add_argument("--keep-serving", action="store_true", help="keep the server running after the demo")
    demo.set_defaults(handler=cmd_demo)
