"""Faults on a live system: the disk cache's filesystem full, a training job killed at a random step.

(The S3 server stopped mid-traffic and a replica killed are in tests/serve/test_ray_serve.py; a
corrupted blob in tests/serve/test_api.py.)
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import metric_samples
from reliability_setup import LOOKS

from lorafleet.registry import AdapterRegistry
from lorafleet.serve.service import decode_npy

pytestmark = pytest.mark.slow  # live servers and load: `make test-fast` skips them


@pytest.fixture
def small_disk(tmp_path, looks_registry):
    """A tmpfs with room for one adapter file and a half."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; DiskTier's write failures have a unit test")
    adapter_bytes = max(m.size for m in looks_registry.list())
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(adapter_bytes * 1.5)}", "tmpfs", str(mount_point)],
                   check=True)
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_cache_keeps_serving_and_counts_the_failures(looks_registry, live_server, small_disk, record):
    server = live_server(looks_registry, cache={"disk_dir": str(small_disk), "host_bytes": 1, "active_max_adapters": 1})
    first: dict[str, np.ndarray] = {}
    statuses = []
    with httpx.Client(base_url=server.url, timeout=120) as client:
        for index in range(20):
            name = LOOKS[index % len(LOOKS)]
            response = client.post("/v1/generate", json={"prompt": "a red circle", "adapter": name, "seed": 1,
                                                         "steps": 1, "width": 32, "height": 32, "output_format": "npy"})
            statuses.append(response.status_code)
            assert response.status_code == 200, response.text
            image = decode_npy(response.json()["images"][0])
            assert np.array_equal(first.setdefault(name, image), image)  # same adapter, same image, every time
        failures = metric_samples(client.get("/metrics").text).get(("lorafleet_disk_cache_write_failures_total", ()),
                                                                   0.0)
    assert failures >= 1, "the full disk was never hit"
    assert len(list(small_disk.glob("*.safetensors"))) <= 1 and not list(small_disk.glob(".part-*"))
    assert "cannot write" in server.log()
    record("disk cache full", {"disk_bytes": "1.5 adapters (tmpfs)", "requests": 20, "adapters": len(LOOKS)},
           {"ok": statuses.count(200), "errors": 20 - statuses.count(200), "write_failures_counted": int(failures)})


def _train_settings(dataset: Path, output: Path) -> list[str]:
    return ["method=lora", f"data.path={dataset}", f"output_dir={output}", "max_steps=24", "checkpoint_every=1",
            "batch_size=4", "optimizer.learning_rate=0.005", "data.trigger=sks", "seed=3"]


def _train_command(dataset: Path, output: Path, registry: AdapterRegistry, *extra: str) -> list[str]:
    command = [sys.executable, "-m", "lorafleet.cli", "train", "--publish", "killed", "--registry", registry.uri]
    for setting in _train_settings(dataset, output):
        command += ["--set", setting]
    return command + list(extra)


def _steps_done(output: Path) -> int:
    try:
        return int(json.loads((output / "metrics.json").read_text())["steps"])
    except (FileNotFoundError, ValueError, KeyError):
        return 0


def test_training_killed_at_a_random_step_publishes_nothing_and_resumes(tmp_path, record):
    from lorafleet.devtools.shapes import write_shapes_folder
    from lorafleet.training.checkpoint import latest_checkpoint
    from lorafleet.training.config import load_train_config
    from lorafleet.training.loop import train

    dataset = write_shapes_folder(tmp_path / "data", 8, colour="cyan", shape="circle")
    registry = AdapterRegistry(f"file://{tmp_path / 'registry'}")
    output = tmp_path / "run"
    kill_at = random.Random().randint(2, 20)
    process = subprocess.Popen(_train_command(dataset, output, registry), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while _steps_done(output) < kill_at and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    killed_after = _steps_done(output)
    assert registry.names() == [], "a killed run published something"

    started = time.perf_counter()
    resumed = subprocess.run(_train_command(dataset, output, registry, "--resume"), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resume_seconds = time.perf_counter() - started
    assert registry.resolve("killed").version == 1

    final_losses = json.loads((latest_checkpoint(output) / "state.json").read_text())["losses"]
    reference = train(load_train_config(None, _train_settings(dataset, tmp_path / "uninterrupted")))
    assert len(final_losses) == 24
    assert np.allclose(final_losses, reference.state.losses, rtol=0, atol=1e-5)
    record("training killed (SIGKILL)", {"max_steps": 24, "checkpoint_every": 1, "killed_at_step": killed_after},
           {"published_before_resume": 0, "resume_exit_code": 0, "resume_seconds": round(resume_seconds, 1),
            "losses_equal_uninterrupted": True})



def test_a_blob_corrupted_in_the_bucket_is_never_served(seaweed, tiny_spec, tmp_path, live_server, record):
    """One byte of an adapter's blob flipped in S3: 502 integrity_error, logged and counted, never an image;
    the other adapters keep serving."""
    from helpers import S3_BUCKET, write_lora

    from lorafleet.registry import PublishRequest
    from lorafleet.registry.adapter_registry import blob_key

    registry = AdapterRegistry(f"s3://{S3_BUCKET}/corrupt-{os.getpid()}")
    healthy = registry.publish(write_lora(tmp_path / "a", tiny_spec, seed=5), PublishRequest(name="healthy", base=tiny_spec))
    victim = registry.publish(write_lora(tmp_path / "b", tiny_spec, seed=6), PublishRequest(name="victim", base=tiny_spec))
    key = registry.store._key(blob_key(victim.digest))
    blob = seaweed.client().get_object(Bucket=S3_BUCKET, Key=key)["Body"].read()
    seaweed.client().put_object(Bucket=S3_BUCKET, Key=key, Body=blob[:-1] + bytes([blob[-1] ^ 1]))

    server = live_server(registry)
    body = {"prompt": "a red circle", "steps": 1, "width": 32, "height": 32}
    with httpx.Client(base_url=server.url, timeout=120) as client:
        answers = [client.post("/v1/generate", json={**body, "adapter": "victim"}) for _ in range(3)]
        fine = client.post("/v1/generate", json={**body, "adapter": "healthy"})
        counted = metric_samples(client.get("/metrics").text).get(
            ("lorafleet_adapter_load_failures_total", (("code", "integrity_error"),)), 0.0)
    assert all(a.status_code == 502 and a.json()["error"]["code"] == "integrity_error" for a in answers)
    assert all("images" not in a.json() for a in answers)
    assert fine.status_code == 200 and fine.json()["adapters"][0]["digest"] == healthy.digest
    assert counted == 3 and "integrity" in server.log().lower()
    record("blob corrupted in the S3 bucket", {"requests_for_corrupted": 3, "requests_for_healthy": 1},
           {"served_corrupted": 0, "status": 502, "integrity_errors_counted": int(counted), "healthy_ok": 1})
