"""Training on Ray: a Ray job (Jobs API on a local cluster) and a 2-worker Ray Train run."""

from __future__ import annotations

import pytest
from lorafleet.registry import AdapterRegistry
from lorafleet.training.config import load_train_config

from lorafleet.devtools.shapes import write_shapes_folder

pytestmark = pytest.mark.slow


def _config(tmp_path, *extra):
    data = write_shapes_folder(tmp_path / "data", 6, colour="green", shape="square")
    return load_train_config(None, [f"data.path={data}", f"output_dir={tmp_path / 'run'}", "max_steps=6",
                                    "data.trigger=sks", "batch_size=2", *extra])


def test_ray_job_trains_and_publishes(tmp_path):
    from lorafleet.training.ray_job import submit_training_job

    registry = AdapterRegistry(f"file://{tmp_path / 'registry'}")
    manifest = submit_training_job(_config(tmp_path), "job-trained", registry.uri)
    assert manifest["name"] == "job-trained" and manifest["version"] == 1
    published = registry.resolve("job-trained")
    assert published.digest == manifest["digest"] and published.method.value == "lora"
    registry.read_blob(published)


def test_two_worker_ray_train_run_produces_a_valid_adapter(tmp_path):
    from lorafleet.training.ray_job import train_data_parallel

    registry = AdapterRegistry(f"file://{tmp_path / 'registry'}")
    manifest = train_data_parallel(_config(tmp_path), "ddp-trained", registry.uri, workers=2)
    assert manifest["name"] == "ddp-trained"
    published = registry.resolve("ddp-trained")
    assert published.training_config["max_steps"] == 6 and published.components["unet"].target_modules
    registry.read_blob(published)
