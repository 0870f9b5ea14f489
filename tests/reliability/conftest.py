"""Live servers for reliability tests: `lorafleet serve --no-ray` in a child process on loopback,
cheap request limits (the tiny base, 32 px, 1-2 steps) so hundreds of requests take seconds."""

from __future__ import annotations

import pytest
from reliability_setup import CHEAP_LIMITS, LOOKS

from lorafleet.registry import AdapterRegistry, PublishRequest


@pytest.fixture(scope="module")
def looks_registry(tmp_path_factory, tiny_spec) -> AdapterRegistry:
    """A file registry with four LoRAs, each with the alias prod."""
    from helpers import write_lora

    root = tmp_path_factory.mktemp("looks")
    registry = AdapterRegistry(f"file://{root / 'registry'}")
    for index, name in enumerate(LOOKS):
        registry.publish(write_lora(root / name, tiny_spec, seed=70 + index),
                         PublishRequest(name=name, base=tiny_spec, aliases=["prod"]))
    return registry


@pytest.fixture
def live_server(tmp_path):
    """start(registry, **settings) -> a running LiveServer, stopped after the test."""
    from lorafleet.devtools.live_server import start_live_server

    started = []

    def start(registry: AdapterRegistry, **settings):
        settings = {"base": "tiny", "registry": registry.uri, "limits": CHEAP_LIMITS, "cache": {"disk_dir": str(tmp_path / "cache")},
                    **settings}
        server = start_live_server(tmp_path / f"server{len(started)}", **settings)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
