"""Training as a service, end to end: a real local Ray cluster (its Jobs API), the real HTTP
gateway, trainings as Ray jobs, a webhook receiver on loopback, the CLI client.

- two trainings with max_concurrent 1: the second waits, then runs; both are published and served;
  webhooks signed (verified here) and retried after a failing receiver, each attempt on the record;
- cancel mid-run: the Ray job stops and nothing is published;
- the gateway restarted mid-job: the new one recovers the training and it finishes;
- `lorafleet train submit --follow`, `status`, `list`, `cancel` against the server.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from contextlib import contextmanager

import httpx
import pytest
from helpers import WebhookReceiver

from lorafleet.devtools.shapes import write_shapes_folder
from lorafleet.local_cluster import free_port
from lorafleet.registry import AdapterRegistry
from lorafleet.registry.errors import AdapterNotFound
from lorafleet.serve.server import serving_in_thread
from lorafleet.serve.settings import load_settings
from lorafleet.training.service.webhooks import verify_signature

pytestmark = pytest.mark.slow
SECRET = "s" * 32


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray

    from lorafleet.training.ray_job import _local_cluster

    os.environ["LORAFLEET_TRAINING_DIR"] = str(tmp_path_factory.mktemp("jobs"))  # reaches the jobs (job_env)
    address = _local_cluster(num_cpus=4)
    yield address
    ray.shutdown()


@pytest.fixture(scope="module")
def registry_uri(tmp_path_factory):
    return f"file://{tmp_path_factory.mktemp('service') / 'registry'}"


@pytest.fixture(scope="module")
def dataset_tar(tmp_path_factory):
    folder = write_shapes_folder(tmp_path_factory.mktemp("data") / "cyan", 6, colour="cyan", shape="circle")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path in sorted(folder.iterdir()):
            archive.add(path, path.name)
    return folder, buffer.getvalue()


@contextmanager
def gateway(registry_uri, address, **trainings):
    settings = load_settings(base="toy", registry=registry_uri, port=free_port(),
                             webhooks={"allowed_hosts": ["127.0.0.1"]},  # the receiver is on loopback
                             trainings={"ray_address": address, "poll_s": 0.3, "webhook_first_delay_s": 0.2,
                                        "default_resources": {"num_cpus": 1}, **trainings})
    with serving_in_thread(settings) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


def _config(steps: int, **extra) -> dict:
    return {"method": "lora", "base": "toy", "max_steps": steps, "batch_size": 2, "seed": 0,
            "data": {"trigger": "sks", "resolution": 32}, "lora": {"rank": 4, "alpha": 4},
            "optimizer": {"learning_rate": 0.001}, **extra}


def _upload(client, dataset_tar) -> str:
    response = client.post("/v1/datasets", content=dataset_tar[1], headers={"Content-Type": "application/gzip"})
    assert response.status_code == 201, response.text
    return response.json()["digest"]


def _training_under_way(client, dataset_tar, steps: int, name: str) -> dict:
    """Upload, submit, and return once the Ray job has trained a step."""
    training = client.post("/v1/trainings", json={"config": _config(steps), "dataset": _upload(client, dataset_tar),
                                                  "publish": {"name": name}}).json()
    _wait(client, training["id"], lambda r: r["step"] > 0)
    return training


def _wait(client, training_id, until, timeout_s=240) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = client.get(f"/v1/trainings/{training_id}").json()
        if until(record):
            return record
        time.sleep(0.3)
    raise AssertionError(f"{training_id} never reached the condition: {record}")


def test_two_trainings_with_a_limit_of_one_run_in_turn_are_published_and_served(cluster, registry_uri, dataset_tar):
    receiver = WebhookReceiver(failures=2)
    with gateway(registry_uri, cluster, max_concurrent=1) as client:
        digest = _upload(client, dataset_tar)
        first = client.post("/v1/trainings", json={
            "config": _config(30, validation_prompts=["sks a circle"], checkpoint_every=10),
            "dataset": digest, "publish": {"name": "svc-first", "aliases": ["prod"]},
            "webhook": {"url": receiver.url, "secret": SECRET}})
        assert first.status_code == 202, first.text
        assert first.headers["Location"] == f"/v1/trainings/{first.json()['id']}"
        second = client.post("/v1/trainings", json={"config": _config(10, publish={"name": "svc-second"}),
                                                     "dataset": digest})
        assert second.status_code == 202, second.text
        first_id, second_id = first.json()["id"], second.json()["id"]

        running = _wait(client, first_id, lambda r: r["state"] == "running")
        assert client.get(f"/v1/trainings/{second_id}").json()["state"] == "queued"  # waits for the slot
        events = []
        with client.stream("GET", f"/v1/trainings/{first_id}/events", timeout=300) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    events.append(line[6:].strip())
        assert {"progress", "checkpoint", "validation", "published"} <= set(events) and events[-1] == "state"
        done = _wait(client, first_id, lambda r: r["state"] == "succeeded")
        assert running["ray_job_id"] == first_id
        assert done["published"]["adapter"] == "svc-first@1" and done["step"] == 30 and len(done["losses"]) == 30
        assert done["validation"]["step"] == 30
        png = client.get(done["validation"]["url"])
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
        second_done = _wait(client, second_id, lambda r: r["state"] in ("succeeded", "failed"))
        assert second_done["state"] == "succeeded", second_done
        assert second_done["started_at"] >= done["finished_at"][:19]  # it ran after the first

        image = client.post("/v1/generate", json={"prompt": "sks a circle", "adapter": "svc-first:prod", "seed": 1})
        assert image.status_code == 200, image.text
        assert image.json()["adapters"][0]["version"] == 1
        listed = client.get("/v1/trainings", params={"state": "succeeded"}).json()
        assert {first_id, second_id} <= {r["id"] for r in listed}

    manifest = AdapterRegistry(registry_uri).resolve("svc-first")
    assert manifest.lineage["dataset"] == digest and manifest.lineage["training_id"] == first_id
    # Webhooks: queued, running, succeeded; the first two attempts failed (500) and were retried.
    deadline = time.monotonic() + 30
    while "training.succeeded" not in receiver.events() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert {"training.queued", "training.running", "training.succeeded"} <= set(receiver.events())
    for headers, body in receiver.received:
        assert verify_signature(SECRET, headers, body)
        assert not verify_signature("another-secret-of-16+", headers, body)
    assert SECRET not in json.dumps(done)
    with gateway(registry_uri, cluster) as client:
        deliveries = _wait(client, first_id, lambda r: any(d["delivered"] and d["event"] == "training.succeeded"
                                                               for d in r["deliveries"]), 30)["deliveries"]
    failed = [d for d in deliveries if not d["delivered"]]
    assert len(failed) == 2 and all(d["status_code"] == 500 for d in failed)
    assert any(d["attempt"] >= 2 and d["delivered"] for d in deliveries)


def test_cancel_mid_run_stops_the_ray_job_and_publishes_nothing(cluster, registry_uri, dataset_tar):
    from ray.job_submission import JobSubmissionClient

    with gateway(registry_uri, cluster) as client:
        training = _training_under_way(client, dataset_tar, 5000, "svc-cancelled")
        cancelled = client.delete(f"/v1/trainings/{training['id']}")
        assert cancelled.status_code == 202 and cancelled.json()["cancel_requested"]
        final = _wait(client, training["id"], lambda r: r["state"] in ("cancelled", "failed", "succeeded"), 120)
        assert final["state"] == "cancelled", final
        assert client.delete(f"/v1/trainings/{training['id']}").status_code == 409
    status = JobSubmissionClient(cluster).get_job_status(training["id"])
    assert str(status).split(".")[-1] in ("STOPPED", "FAILED")
    with pytest.raises(AdapterNotFound):
        AdapterRegistry(registry_uri).list("svc-cancelled")


def test_a_restarted_gateway_recovers_the_training_and_it_finishes(cluster, registry_uri, dataset_tar):
    with gateway(registry_uri, cluster) as client:
        training = _training_under_way(client, dataset_tar, 120, "svc-restarted")
    # The gateway is gone; the Ray job trains on. A new gateway reads the record and reconciles.
    with gateway(registry_uri, cluster) as client:
        listed = client.get("/v1/trainings").json()
        assert training["id"] in {r["id"] for r in listed}
        final = _wait(client, training["id"], lambda r: r["state"] in ("succeeded", "failed", "cancelled"))
        assert final["state"] == "succeeded", final
        assert final["published"]["adapter"] == "svc-restarted@1"
        # A client that reconnects with Last-Event-ID gets only what it has not seen.
        headers = {"Last-Event-ID": "2:0"}  # saw queued and running, no job event
        with client.stream("GET", f"/v1/trainings/{training['id']}/events", headers=headers) as stream:
            lines = [line for line in stream.iter_lines() if line.startswith(("event:", "data:"))]
        states = [json.loads(line[5:])["state"] for line in lines if line.startswith("data:") and '"state"' in line
                  and '"reason"' in line]
        assert states == ["succeeded"], states
        assert "event: published" in lines and lines.count("event: state") == 1


def test_a_training_whose_ray_job_vanished_is_failed_with_the_reason(cluster, registry_uri):
    from datetime import timedelta

    from lorafleet.training.service.records import PublishTarget, TrainingRecord, TrainingRecords, TrainingState, now

    records = TrainingRecords(AdapterRegistry(registry_uri).store)
    lost = TrainingRecord(id="tr-" + "ab" * 10, state=TrainingState.running, config=_config(5),
                          dataset="sha256:" + "0" * 64, publish=PublishTarget(name="svc-lost"),
                          ray_job_id="tr-" + "ab" * 10, started_at=now() - timedelta(hours=1))
    records.create(lost)
    with gateway(registry_uri, cluster) as client:
        final = _wait(client, lost.id, lambda r: r["state"] != "running", 30)
    assert final["state"] == "failed" and "vanished" in final["error"]


def test_the_cli_submits_follows_lists_and_cancels(cluster, registry_uri, dataset_tar, tmp_path):
    import yaml

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({**_config(12), "data": {"path": "ignored", "trigger": "sks"}}))
    cli = [sys.executable, "-m", "lorafleet.cli", "train"]
    with gateway(registry_uri, cluster) as client:
        url = str(client.base_url).rstrip("/")
        submitted = subprocess.run(cli + ["submit", str(config), "--data", str(dataset_tar[0]), "--server", url,
                                          "--name", "svc-cli", "--follow"], capture_output=True, text=True,
                                   timeout=300)
        assert submitted.returncode == 0, submitted.stderr[-3000:]
        training_id = submitted.stdout.splitlines()[0]
        assert "succeeded" in submitted.stdout and "svc-cli@1" in submitted.stdout
        assert "step" in submitted.stderr  # the progress bar
        status = subprocess.run(cli + ["status", training_id, "--server", url, "--json"], capture_output=True,
                                text=True, timeout=60)
        assert json.loads(status.stdout)["state"] == "succeeded"
        listing = subprocess.run(cli + ["list", "--server", url], capture_output=True, text=True, timeout=60)
        assert training_id in listing.stdout
        late = subprocess.run(cli + ["cancel", training_id, "--server", url], capture_output=True, text=True,
                              timeout=60)
        assert late.returncode == 1 and "already succeeded" in late.stderr and "Traceback" not in late.stderr
