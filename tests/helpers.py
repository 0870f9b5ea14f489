"""Helpers for tests: adapter files on disk, registry snapshots, a webhook receiver on loopback."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch

from lorafleet.registry import AdapterRegistry, PublishRequest
from lorafleet.synthetic import synthetic_embedding, synthetic_lora

S3_BUCKET = "lorafleet-tests"  # created by the session's SeaweedFS fixture

# Pipelines loaded from files hold tensors mmap-ed at unaligned offsets; on some CPUs (AMD EPYC
# here) the kernels then take other vector paths, and the same weights draw images that differ in
# the last bits. Same weights are checked bit for bit; their images within this.
SAME_WEIGHTS_IMAGE_TOLERANCE = 1e-5


def write_lora(directory: Path, spec, seed: int = 0, name: str = "lora.safetensors", **kwargs) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(synthetic_lora(spec, seed=seed, **kwargs).to_bytes())
    return path


def write_embedding(directory: Path, spec, token: str, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{token}.safetensors"
    path.write_bytes(synthetic_embedding(spec, token, seed=seed).to_bytes())
    return path


def publish_lora(registry: AdapterRegistry, spec, tmp_path: Path, name: str = "style", seed: int = 0,
                 aliases=(), **request_fields):
    path = write_lora(tmp_path / f"src-{name}-{seed}", spec, seed=seed)
    return registry.publish(path, PublishRequest(name=name, base=spec, aliases=list(aliases), **request_fields))


def snapshot(registry: AdapterRegistry) -> dict[str, bytes]:
    """Every object in the registry, for 'nothing changed' checks."""
    result = {}
    for info in registry.store.list(""):
        if info.key.startswith("."):
            continue
        stored = registry.store.read(info.key)
        result[info.key] = stored.data if stored else b""
    return result


def metric_samples(text: str) -> dict:
    """Prometheus text -> {(sample name, sorted label pairs): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def wait_until_in_flight(metrics_text, requests, timeout_s: float = 60.0) -> None:
    """Until the gateway's queue-depth gauge (read by ``metrics_text()``) counts every one of
    ``requests`` (futures) in flight. A fixed sleep made cut-in tests depend on the machine's
    speed: in one CI run the flood had ended before the quiet request came."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not any(r.done() for r in requests):
        if metric_samples(metrics_text()).get(("lorafleet_queue_depth", ()), 0) >= len(requests):
            return
        time.sleep(0.05)
    answered = [r.result().status_code for r in requests if r.done()]
    raise AssertionError(f"the flood was never all in flight at once (answered meanwhile: {answered})")


def soak_scaled(ci_value, soak_value):
    """CI runs the reliability tests with bounded parameters; `make soak` (LORAFLEET_SOAK=1) with larger ones."""
    import os

    return soak_value if os.environ.get("LORAFLEET_SOAK") == "1" else ci_value


class WebhookReceiver:
    """A webhook receiver that fails its first ``failures`` deliveries."""

    def __init__(self, failures: int = 0):
        self.failures, self.received = failures, []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((dict(self.headers), body))
                failing = len(receiver.received) <= receiver.failures
                self.send_response(500 if failing else 204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def events(self) -> list[str]:
        return [json.loads(body)["event"] for _, body in self.received]


def assert_same_model(pipe, other, image: np.ndarray, other_image: np.ndarray) -> None:
    """Every component's weights equal bit for bit, and the images they draw equal up to the last
    bits (``SAME_WEIGHTS_IMAGE_TOLERANCE``)."""
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            ours, theirs = component.state_dict(), getattr(other, name).state_dict()
            assert ours.keys() == theirs.keys(), name
            assert all(torch.equal(ours[key], theirs[key]) for key in ours), name
    assert np.abs(image - other_image).max() <= SAME_WEIGHTS_IMAGE_TOLERANCE
