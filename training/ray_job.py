"""Training on Ray: as a Ray job (Jobs API), or data-parallel with Ray Train's TorchTrainer.

Either way the result is the same adapter format, published the same way.
"""

from __future__ import annotations

# Imports inside functions: Ray only when a job goes to a cluster; the loop only inside the
# worker.
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import yaml

from lorafleet.local_cluster import free_port, job_env, secure_local_ray

from .config import TrainConfig
from .errors import TrainingClusterUnavailable, TrainingJobFailed

RESULT_MARKER = "LORAFLEET_RESULT "
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _local_cluster(num_cpus: int | None = None) -> str:
    """Start a local Ray cluster with the job server; returns its dashboard address."""
    import ray

    secure_local_ray()
    port = free_port()
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=True,
             dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=False)
    return f"http://127.0.0.1:{port}"


def _wait_for_job_server(client_factory, address: str, timeout_s: float = 60):
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            return client_factory(address)
        except Exception as exc:  # the dashboard takes a few seconds to come up
            last = exc
            time.sleep(1)
    raise TrainingClusterUnavailable(f"Ray job server at {address} did not answer: {last}")


def submit_training_job(config: TrainConfig, name: str | None, registry_uri: str | None,
                        address: str | None = None, resume: bool = False, timeout_s: float = 3600) -> dict | None:
    """Run `lorafleet train` as a Ray job; returns the published manifest (or None)."""
    from ray.job_submission import JobSubmissionClient

    started_here = address is None
    if started_here:
        address = _local_cluster()
    try:
        client = _wait_for_job_server(JobSubmissionClient, address)
        config_path = _write_config(config)
        command = [sys.executable, "-m", "lorafleet.cli", "train", str(config_path), "--result-json"]
        command += ["--publish", name] if name else []
        command += ["--registry", registry_uri] if registry_uri else []
        command += ["--resume"] if resume else []
        job_id = _submit(client, shlex.join(command), {"env_vars": job_env(dict(os.environ))})
        status = _wait(client, job_id, timeout_s)
        logs = client.get_job_logs(job_id)
        if status != "SUCCEEDED":
            raise TrainingJobFailed(f"Ray job {job_id} {status}: {logs[-2000:]}")
        return _result_from_logs(logs)
    finally:
        if started_here:
            import ray

            ray.shutdown()


def _submit(client, entrypoint: str, runtime_env: dict, timeout_s: float = 60) -> str:
    """Submit, retrying while the new cluster's job agent is still starting."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(1)


def _write_config(config: TrainConfig) -> Path:
    directory = Path(config.output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=directory, delete=False, prefix="job-config-")
    with handle:
        yaml.safe_dump(config.model_dump(mode="json"), handle)
    return Path(handle.name)


def _wait(client, job_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        if status in TERMINAL:
            return status
        time.sleep(1)
    client.stop_job(job_id)
    raise TrainingJobFailed(f"Ray job {job_id} did not finish within {timeout_s:.0f}s; stopped")


def _result_from_logs(logs: str) -> dict | None:
    for line in reversed(logs.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):]).get("manifest")
    return None


def _train_worker(payload: dict) -> None:
    """Ray Train worker: the same Trainer, gradients averaged across workers (gloo on CPU)."""
    import ray.train
    import torch.distributed as dist

    from lorafleet.registry import AdapterRegistry

    from .loop import Trainer
    from .publish import publish_result

    config = TrainConfig.model_validate(payload["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    trainer = Trainer(config, rank=rank, world_size=world)

    def average_gradients(parameters):
        for parameter in parameters:
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad)
                parameter.grad /= world

    trainer.after_backward = average_gradients
    if payload["resume"]:
        trainer.resume()
    result = trainer.run(save_checkpoints=rank == 0)
    if rank != 0:
        ray.train.report({"loss_final": result.metrics["loss_final"]})
        return
    manifest = None
    if payload["name"]:
        registry = AdapterRegistry(payload["registry"])
        manifest = json.loads(publish_result(result, config, registry, payload["name"]).model_dump_json())
    with tempfile.TemporaryDirectory() as folder:  # Ray Train keeps reported results with a checkpoint
        (Path(folder) / "result.json").write_text(json.dumps({"manifest": manifest, "metrics": result.metrics},
                                                             default=str))
        ray.train.report({"loss_final": result.metrics["loss_final"]},
                         checkpoint=ray.train.Checkpoint.from_directory(folder))


def train_data_parallel(config: TrainConfig, name: str | None, registry_uri: str | None, workers: int,
                        address: str | None = None, resume: bool = False) -> dict | None:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started_here = not ray.is_initialized()
    if started_here:
        if not address:
            secure_local_ray()
        ray.init(address=address or "local", num_cpus=None if address else os.cpu_count(),
                 include_dashboard=False, log_to_driver=False)
    try:
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={"config": config.model_dump(mode="json"), "name": name, "registry": registry_uri,
                               "resume": resume},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(storage_path=str(Path(config.output_dir).resolve() / "ray-train"),
                                 name="lorafleet"),
        )
        result = trainer.fit()
        if result.error:
            raise TrainingJobFailed(f"Ray Train run failed: {result.error}")
        with result.checkpoint.as_directory() as folder:
            return json.loads((Path(folder) / "result.json").read_text())["manifest"]
    finally:
        if started_here:
            ray.shutdown()


def run_on_ray(config: TrainConfig, *, name: str | None, registry_uri: str | None, address: str | None,
               workers: int, resume: bool) -> dict | None:
    if workers:
        return train_data_parallel(config, name, registry_uri, workers, address, resume)
    return submit_training_job(config, name, registry_uri, address, resume)
