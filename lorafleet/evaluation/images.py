"""Images for evaluation, from a lorafleet server's public API (npy: exact float arrays)."""

from __future__ import annotations

# Imports inside functions: the in-process server only when no server URL is given; the toy-world
# request helper (torch) only when images are drawn.
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import numpy as np

from lorafleet.errors import ErrorKind, LorafleetError

CHUNK = 4  # images per request: within the default limits.max_num_images


class GenerationFailed(LorafleetError):
    code = "generation_failed"
    kind = ErrorKind.unavailable


class ServerImages:
    """Images as the toy-world runs draw them (toyworld.concepts.generate_over_http), in requests
    of at most CHUNK images."""

    def __init__(self, client: httpx.Client):
        self.client = client

    def images(self, prompt: str, ref: str | None, seeds: int, first_seed: int = 1000) -> list[np.ndarray]:
        """``seeds`` images of ``prompt`` (seeds first_seed, first_seed + 1, ...), with ``ref`` or the base."""
        from lorafleet.toyworld.concepts import generate_over_http

        images: list[np.ndarray] = []
        while len(images) < seeds:
            count = min(CHUNK, seeds - len(images))
            try:
                images += generate_over_http(self.client, prompt, ref, count, seed=first_seed + len(images))
            except RuntimeError as exc:
                raise GenerationFailed(f"{prompt!r} with {ref or 'the base'}: {exc}", field="candidate") from exc
        return images


@contextmanager
def server_images(server: str | None, token: str | None, base: str, registry: str | None) -> Iterator[ServerImages]:
    """Through ``server``, or a server started in this process on ``base`` (no Ray)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if server:
        with httpx.Client(base_url=server, headers=headers, timeout=600) as client:
            yield ServerImages(client)
        return
    from lorafleet.local_cluster import free_port
    from lorafleet.serve.server import serving_in_thread
    from lorafleet.serve.settings import load_settings

    settings = load_settings(base=base, registry=registry, port=free_port(), limits={"max_num_images": CHUNK},
                             output_cache={"enabled": False}, feedback={"enabled": False})
    with serving_in_thread(settings) as url, httpx.Client(base_url=url, timeout=600) as client:
        yield ServerImages(client)
