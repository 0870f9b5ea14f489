"""Publish/serve consistency: while 4 publishers publish versions and move `prod`, 4 clients
generate with `flip:prod`. Every response names a digest `prod` pointed to at some moment, and its
image is exactly the image of that digest's adapter."""

from __future__ import annotations

import random
import threading
import time

import httpx
import numpy as np
import pytest
from helpers import soak_scaled, write_lora

from lorafleet.registry import AdapterRegistry, PublishRequest
from lorafleet.serve.service import decode_npy

pytestmark = pytest.mark.slow  # live servers and load: `make test-fast` skips them

PUBLISHERS, CLIENTS = 4, 4
ROUNDS = soak_scaled(6, 12)  # 4 x 12 + 1 moves stay within the alias history kept (50)


def _body(ref: str) -> dict:
    return {"prompt": "a red circle", "adapter": ref, "seed": 7, "steps": 1, "width": 32, "height": 32,
            "output_format": "npy"}


def _image(response) -> np.ndarray:
    return decode_npy(response.json()["images"][0])


def test_clients_only_see_what_prod_pointed_to(tiny_spec, tmp_path, live_server, record):
    registry = AdapterRegistry(f"file://{tmp_path / 'registry'}")
    registry.publish(write_lora(tmp_path / "v0", tiny_spec, seed=500), PublishRequest(name="flip", base=tiny_spec,
                                                                                       aliases=["prod"]))
    server = live_server(registry, resolution_ttl_s=0, max_queued_requests=64)
    publishing_done = threading.Event()
    served: list[tuple[str, np.ndarray]] = []
    failures: list[str] = []

    def publish(worker: int) -> None:
        for round_ in range(ROUNDS):
            path = write_lora(tmp_path / f"p{worker}-{round_}", tiny_spec, seed=1000 * (worker + 1) + round_)
            manifest = registry.publish(path, PublishRequest(name="flip", base=tiny_spec))
            registry.set_alias("flip", "prod", manifest.version)
            time.sleep(random.uniform(0.1, 0.6))  # moves spread over the clients' traffic

    def generate() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            while not publishing_done.is_set():
                response = client.post("/v1/generate", json=_body("flip:prod"))
                if response.status_code != 200:
                    failures.append(response.text)
                    continue
                served.append((response.json()["adapters"][0]["digest"], _image(response)))

    started = time.perf_counter()
    clients = [threading.Thread(target=generate) for _ in range(CLIENTS)]
    publishers = [threading.Thread(target=publish, args=(i,)) for i in range(PUBLISHERS)]
    for thread in clients + publishers:
        thread.start()
    for thread in publishers:
        thread.join()
    time.sleep(1.0)  # let clients see the last move
    publishing_done.set()
    for thread in clients:
        thread.join()
    seconds = time.perf_counter() - started

    assert not failures, failures[:3]
    digest_of = {m.version: m.digest for m in registry.list("flip")}
    history = registry.alias_record("flip", "prod").history
    assert len(history) == 1 + PUBLISHERS * ROUNDS
    prod_digests = {digest_of[move.version] for move in history}
    served_digests = {digest for digest, _ in served}
    assert served_digests <= prod_digests, served_digests - prod_digests
    assert len(served_digests) >= 3, "clients saw too few moves for the test to mean anything"

    with httpx.Client(base_url=server.url, timeout=120) as client:
        expected = {d: _image(client.post("/v1/generate", json=_body(f"flip@{d}"))) for d in served_digests}
    worst = max(float(np.abs(image - expected[digest]).max()) for digest, image in served)
    assert worst <= 1e-5, worst
    distinct = list(expected.values())
    assert all(np.abs(distinct[0] - other).max() > 1e-3 for other in distinct[1:]), "adapters look alike"
    record("publish/serve consistency", {"publishers": PUBLISHERS, "clients": CLIENTS, "alias_moves": len(history)},
           {"requests": len(served), "errors": len(failures), "digests_served": len(served_digests),
            "wrong_digest": 0, "max_image_diff": worst, "seconds": round(seconds, 1)})
