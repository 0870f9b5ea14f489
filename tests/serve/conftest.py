"""Fixtures for serving tests: a registry with adapters (constants and the plain-diffusers reference are in
serve_setup.py: conftest modules are not importable by name when several exist)."""

from __future__ import annotations

import pytest

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
