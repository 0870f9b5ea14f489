"""Training jobs on a Ray cluster through the Ray Jobs API.

The training id is the Ray submission id, so a submit repeated after a crash (or by a second
gateway) finds the job that exists instead of starting another.
"""

from __future__ import annotations

# Imports inside functions: Ray's job client only when a gateway talks to a training cluster.
import os
import shlex
import sys
import time
from dataclasses import dataclass
from enum import Enum

from lorafleet.local_cluster import job_env

from ..errors import TrainingsUnavailable


class RayJobState(str, Enum):
    pending = "PENDING"
    running = "RUNNING"
    succeeded = "SUCCEEDED"
    failed = "FAILED"
    stopped = "STOPPED"


@dataclass(frozen=True)
class JobSpec:
    training_id: str
    registry_uri: str
    num_cpus: float
    num_gpus: float

    def entrypoint(self) -> str:
        """The same command as `lorafleet train --ray`, told which stored training it runs."""
        return shlex.join([sys.executable, "-m", "lorafleet.cli", "train", "--job", self.training_id,
                           "--registry", self.registry_uri])


class RayJobRunner:
    def __init__(self, address: str, token: str | None = None, connect_timeout_s: float = 30.0):
        self.address = address
        self.headers = {"Authorization": f"Bearer {token}"} if token else None  # else Ray's own token
        self.connect_timeout_s = connect_timeout_s
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            deadline, last = time.monotonic() + self.connect_timeout_s, None
            while time.monotonic() < deadline:
                try:
                    self._client = JobSubmissionClient(self.address, headers=self.headers)
                    break
                except Exception as exc:  # the job server is still starting, or unreachable
                    last = exc
                    time.sleep(1)
            else:
                raise TrainingsUnavailable(f"the training Ray cluster at {self.address} does not answer: {last}")
        return self._client

    def submit(self, spec: JobSpec) -> str:
        deadline = time.monotonic() + 60
        while True:
            try:
                return self.client.submit_job(
                    entrypoint=spec.entrypoint(), submission_id=spec.training_id,
                    entrypoint_num_cpus=spec.num_cpus, entrypoint_num_gpus=spec.num_gpus or None,
                    runtime_env={"env_vars": job_env(dict(os.environ))})
            except RuntimeError as exc:
                if "already exists" in str(exc):
                    return spec.training_id  # submitted before (a retry, or another gateway)
                if "No available agent" not in str(exc) or time.monotonic() > deadline:
                    raise TrainingsUnavailable(f"Ray refused the training job: {exc}") from exc
                time.sleep(1)

    def state(self, job_id: str) -> RayJobState | None:
        """The job's state, or None when Ray does not know it."""
        try:
            status = self.client.get_job_status(job_id)
        except RuntimeError as exc:
            if "does not exist" in str(exc) or "not found" in str(exc).lower():
                return None
            raise TrainingsUnavailable(f"Ray job status of {job_id}: {exc}") from exc
        return RayJobState(str(getattr(status, "value", status)).split(".")[-1])

    def stop(self, job_id: str) -> None:
        try:
            self.client.stop_job(job_id)
        except RuntimeError as exc:
            if "does not exist" not in str(exc):
                raise TrainingsUnavailable(f"Ray could not stop {job_id}: {exc}") from exc

    def logs_tail(self, job_id: str, chars: int = 2000) -> str:
        try:
            return self.client.get_job_logs(job_id)[-chars:]
        except RuntimeError:
            return ""
