"""Fixtures for serving tests: a registry with adapters, and a live Ray Serve app (constants and the
plain-diffusers reference are in serve_setup.py, the app's tokens and calls in ray_app.py: conftest modules
are not importable by name when several exist)."""

from __future__ import annotations

import time

import pytest
from ray_app import TOKENS, ray_children

from lorafleet.registry import AdapterRegistry, PublishRequest


@pytest.fixture(scope="module")
def adapter_registry(tmp_path_factory, tiny_spec):
    """A file registry with five LoRAs (one also on the text encoder) and a textual inversion."""
    from helpers import write_embedding, write_lora

    root = tmp_path_factory.mktemp("serve-registry")
    registry = AdapterRegistry(f"file://{root / 'registry'}")
    for index in range(5):
        te = ("q_proj", "v_proj") if index == 0 else ()
        path = write_lora(root / f"src{index}", tiny_spec, seed=10 + index, text_encoder_targets=te)
        registry.publish(path, PublishRequest(name=f"style{index}", base=tiny_spec, aliases=["prod"]))
    registry.publish(write_embedding(root / "ti", tiny_spec, "<sks>", seed=3),
                     PublishRequest(name="sks-token", base=tiny_spec))
    return registry


@pytest.fixture(scope="module")
def pulled_files(adapter_registry, tmp_path_factory):
    directory = tmp_path_factory.mktemp("pulled")
    files = {}
    for name in [f"style{i}" for i in range(5)] + ["sks-token"]:
        _, path = adapter_registry.pull(name, directory)
        files[name] = path
    return files


@pytest.fixture
def fetcher(adapter_registry):
    """A fetcher over the module's registry: host tier only (64 MiB), no disk tier."""
    from lorafleet.serve.adapter_cache import AdapterFetcher

    return AdapterFetcher(adapter_registry, host_bytes=64 * 1024**2, disk=None)


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """SeaweedFS on loopback with a bucket ``serve``, for ``live``'s registry."""
    from lorafleet.devtools.seaweed import start_seaweed

    server = start_seaweed(tmp_path_factory.mktemp("ray-s3"))
    server.create_bucket("serve")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def live(s3_server, tiny_spec, tmp_path_factory):
    """A Ray Serve app on loopback, one per test module that asks (tokens and calls: ray_app.py): 2 generator
    replicas, tenants team-a and team-b, seven LoRAs look0..look6 in an S3 registry. Gives the registry,
    the server's URL and the adapters' pulled files."""
    from helpers import write_lora

    from lorafleet.local_cluster import free_port
    from lorafleet.serve.server import start_server
    from lorafleet.serve.settings import ServeSettings

    with pytest.MonkeyPatch.context() as environment:  # restored even when the set-up fails half-way
        for key, value in {**s3_server.env(), "LORAFLEET_S3_CONNECT_TIMEOUT": "1",
                           "LORAFLEET_S3_MAX_ATTEMPTS": "1"}.items():
            environment.setenv(key, value)
        root = tmp_path_factory.mktemp("ray-e2e")
        registry = AdapterRegistry("s3://serve/adapters")
        for index in range(7):
            path = write_lora(root / f"src{index}", tiny_spec, seed=40 + index)
            registry.publish(path, PublishRequest(name=f"look{index}", base=tiny_spec, aliases=["prod"]))
        files = {f"look{i}": registry.pull(f"look{i}", root / "pulled")[1] for i in range(7)}
        settings = ServeSettings(
            base="tiny", registry=registry.uri, port=free_port(), replicas=2, replica_num_cpus=0.5, fuse_after=3,
            resolution_ttl_s=1.0, auth_enabled=True, api_tokens=TOKENS,
            tenants={"team-a": {"namespaces": ["look"]}, "team-b": {"namespaces": ["look"]}},
            cache={"disk_dir": str(root / "cache"), "active_max_adapters": 1},
        )
        server = start_server(settings, num_cpus=2)  # a start that fails stops what it started
        try:
            yield registry, server.url, files
        finally:
            server.stop()
            deadline = time.monotonic() + 30
            while ray_children() and time.monotonic() < deadline:
                time.sleep(0.5)
    assert ray_children() == [], "Ray processes left behind"
