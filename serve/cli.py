"""`lorafleet serve`: run the Serve app on a local Ray cluster (or print its Serve config)."""

from __future__ import annotations

# Imports inside functions: building the command-line parser must not import torch, diffusers or
# Ray (`lorafleet --help` takes 0.3 s).
import sys
from pathlib import Path

import yaml

from .settings import load_settings


def serve_config(settings) -> dict:
    """What `serve build lorafleet.serve.app:app_builder` gives, with these settings as args."""
    from .app import APP_NAME, GATEWAY_NAME, GENERATOR_NAME, gateway_options, generator_options

    generator = {"name": GENERATOR_NAME, **generator_options(settings)}
    return {
        "proxy_location": settings.proxy_location.value,
        "http_options": {"host": settings.host, "port": settings.port},
        "applications": [{
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": "lorafleet.serve.app:app_builder",
            # Secrets never go into the Serve config: tokens come from the environment (a Secret).
            "args": settings.model_dump(mode="json", exclude={"config_file", "host", "api_tokens", "tokens_file",
                                                 "proxy_location"},
                                        exclude_none=True),
            "deployments": [{"name": GATEWAY_NAME, **gateway_options(settings)}, generator],
        }],
    }


def _settings(args):
    return load_settings(Path(args.config) if args.config else None, base=args.base, base_config=args.base_config,
                         registry=args.registry,
                         host=args.host, port=args.port, replicas=args.replicas,
                         insecure_no_auth=True if args.insecure_no_auth else None)


def cmd_serve(args) -> int:
    from .server import install_stop_handlers, serve_in_process, start_server

    settings = _settings(args)
    if settings.insecure_no_auth and not settings.auth_required:
        print(f"WARNING: auth is OFF on {settings.host}:{settings.port} (--insecure-no-auth): anyone who can reach "
              "this port can generate, move aliases and read metrics", file=sys.stderr, flush=True)
    if args.print_config:
        print(yaml.safe_dump(serve_config(settings), sort_keys=False))
        return 0
    if args.no_ray:
        serve_in_process(settings)
        return 0
    server = start_server(settings, ray_address=args.ray_address)
    stop = install_stop_handlers()
    print(f"lorafleet is serving base {settings.base!r} at {server.url} (POST /v1/generate); Ctrl-C stops it",
          flush=True)
    try:
        stop.wait()
    finally:
        server.stop()
    return 0


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="serve adapters over HTTP with Ray Serve")
    parser.add_argument("--base", help="built-in base (toy, tiny, small, tiny-sdxl, tiny-flux, tiny-sd3), a diffusers "
                                       "directory or a .safetensors checkpoint")
    parser.add_argument("--base-config", help="diffusers directory with the configs (Flux: the other components) of a "
                        "single-file --base")
    parser.add_argument("--registry", help="registry URI")
    parser.add_argument("--host", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (default 8000)")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="allow a non-loopback --host with auth off: anyone who reaches it is admin")
    parser.add_argument("--config", help="YAML settings file (keys as in ServeSettings)")
    parser.add_argument("--replicas", type=int, help="generator replicas (without autoscaling)")
    parser.add_argument("--ray-address", help="an existing Ray cluster (default: start a local one)")
    parser.add_argument("--no-ray", action="store_true",
                        help="run in this process with uvicorn (one replica, no Ray): development, tests")
    parser.add_argument("--print-config", action="store_true", help="print the Serve config (serve deploy) and exit")
    parser.set_defaults(handler=cmd_serve)
