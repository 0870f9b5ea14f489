"""Training on Ray: a Ray job (Jobs API on a local cluster) and a 2-worker Ray Train run."""

from __future__ import annotations

import pytest

from lorafleet.devtools.shapes import write_shapes_folder
from lorafleet.registry import AdapterRegistry
from lorafleet.training.config import load_train_config

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


def test_job_env_carries_settings_never_secrets():
    from lorafleet.local_cluster import job_env

    environ = {"AWS_ENDPOINT_URL": "http://s3", "AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "AKIA",
               "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "t", "LORAFLEET_REGISTRY": "s3://b/p",
               "LORAFLEET_API_TOKENS": "x=admin", "LORAFLEET_DB_PASSWORD": "p", "HOME": "/root"}
    assert job_env(environ) == {"AWS_ENDPOINT_URL": "http://s3", "AWS_DEFAULT_REGION": "us-east-1",
                                "LORAFLEET_REGISTRY": "s3://b/p"}


def test_the_local_cluster_uses_ray_token_auth_and_jobs_carry_no_secrets(monkeypatch):
    """A cluster lorafleet starts refuses callers without its token; a job's stored runtime_env
    (which Ray shows to anyone who may list jobs) holds no secret."""
    import os

    import httpx
    import ray
    from ray.job_submission import JobSubmissionClient

    from lorafleet.local_cluster import job_env
    from lorafleet.training import ray_job

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret")
    monkeypatch.setenv("LORAFLEET_API_TOKENS", "t" * 40 + "=admin")
    address = ray_job._local_cluster(num_cpus=1)
    try:
        assert os.environ["RAY_AUTH_MODE"] == "token" and len(os.environ["RAY_AUTH_TOKEN"]) == 64
        assert httpx.get(f"{address}/api/jobs/", timeout=10).status_code == 401
        client = ray_job._wait_for_job_server(JobSubmissionClient, address)
        job_id = ray_job._submit(client, "python -c pass", {"env_vars": job_env(dict(os.environ))})
        stored = str(client.get_job_info(job_id).runtime_env)
        assert "very-secret" not in stored and "t" * 40 not in stored
    finally:
        ray.shutdown()
