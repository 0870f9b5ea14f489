"""Rewrite serveConfigV2 in the k8s manifests from each serve.yaml (run after changing settings).

    .venv/bin/python scripts/k8s_sync_serve_config.py

The tests (tests/k8s) fail when a manifest's serveConfigV2 differs from what this writes.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from lorafleet.serve.cli import serve_config
from lorafleet.serve.settings import load_settings

K8S = Path(__file__).resolve().parents[1] / "k8s"
TARGETS = {
    K8S / "base" / "rayservice.yaml": K8S / "base" / "serve.yaml",
    K8S / "overlays" / "cpu-dev" / "rayservice-patch.yaml": K8S / "overlays" / "cpu-dev" / "serve.yaml",
    K8S / "overlays" / "gpu-prod" / "rayservice-patch.yaml": K8S / "overlays" / "gpu-prod" / "serve.yaml",
}
START, END = "  serveConfigV2: |\n", "  rayClusterConfig:"


def sync(manifest: Path, settings_file: Path) -> bool:
    text = manifest.read_text()
    config = yaml.safe_dump(serve_config(load_settings(settings_file)), sort_keys=False).rstrip()
    block = "\n".join(("    " + line) if line else "" for line in config.splitlines()) + "\n"
    start = text.index(START) + len(START)
    end = text.find(END, start)
    updated = text[:start] + block + (text[end:] if end >= 0 else "")
    manifest.write_text(updated)
    return updated != text


if __name__ == "__main__":
    for manifest, settings_file in TARGETS.items():
        changed = sync(manifest, settings_file)
        print(f"{'updated' if changed else 'unchanged'}: {manifest.relative_to(K8S.parent)}")
