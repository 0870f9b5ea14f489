"""Shared fixtures: the tiny base's spec, a real S3 server, and registries on every backend."""

from __future__ import annotations

import os
import uuid

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from helpers import S3_BUCKET  # noqa: E402 (after the environment defaults)


@pytest.fixture(scope="session")
def tiny_spec():
    from lorafleet.bases import base_spec

    return base_spec("tiny")


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """A SeaweedFS S3 server on loopback for the whole session, with its env set."""
    from lorafleet.devtools.seaweed import start_seaweed

    server = start_seaweed(tmp_path_factory.mktemp("seaweed"))
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    server.create_bucket(S3_BUCKET)
    yield server
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(params=["file", "s3"])
def registry_uri(request, tmp_path):
    """A fresh, empty registry on each backend."""
    if request.param == "file":
        return f"file://{tmp_path / 'registry'}"
    request.getfixturevalue("seaweed")
    return f"s3://{S3_BUCKET}/{uuid.uuid4().hex}"


@pytest.fixture
def registry(registry_uri):
    from lorafleet.registry import AdapterRegistry

    return AdapterRegistry(registry_uri)


def pytest_collection_modifyitems(config, items):
    """GPU-only tests (marked `gpu`) skip where no CUDA device exists; their logic has CPU tests."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def record():
    """record(test, parameters, figures): one row of docs/reliability.md (`lorafleet bench reliability`).

    Rows go to $LORAFLEET_RELIABILITY_RECORD (JSON lines) when set, and always to the test's output.
    """
    import json

    path = os.environ.get("LORAFLEET_RELIABILITY_RECORD")

    def write(test: str, parameters: dict, figures: dict) -> None:
        row = {"test": test, "parameters": parameters, "figures": figures}
        print("reliability:", json.dumps(row))
        if path:
            with open(path, "a") as handle:
                handle.write(json.dumps(row) + "\n")

    return write
