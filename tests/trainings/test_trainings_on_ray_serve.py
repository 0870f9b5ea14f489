"""The training service in its deployment shape: the Gateway deployment of the Ray Serve app
submits to the job server of the cluster `lorafleet serve` started (trainings without an address),
and a Gateway replica killed mid-job is replaced by one that recovers the training."""

from __future__ import annotations

import io
import os
import tarfile
import time

import httpx
import pytest

from lorafleet.devtools.shapes import write_shapes_folder
from lorafleet.local_cluster import free_port
from lorafleet.serve.settings import ServeSettings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from lorafleet.serve.server import start_server

    root = tmp_path_factory.mktemp("trainings-serve")
    os.environ["LORAFLEET_TRAINING_DIR"] = str(root / "jobs")
    settings = ServeSettings(base="toy", registry=f"file://{root / 'registry'}", port=free_port(),
                             replica_num_cpus=0.5, trainings={"poll_s": 0.3})
    server = start_server(settings, num_cpus=3)
    try:
        yield server.url, root
    finally:
        server.stop()


def _gateway_replicas() -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == "serve" and "#Gateway#" in a["name"])


def _wait(client, training_id, until, timeout_s=240):
    deadline, record = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            response = client.get(f"/v1/trainings/{training_id}")
            if response.status_code == 200:
                record = response.json()
                if until(record):
                    return record
        except httpx.HTTPError:  # the gateway is being replaced
            pass
        time.sleep(0.3)
    raise AssertionError(f"{training_id} never reached the condition: {record}")


def test_a_training_survives_its_gateway_replica_and_is_served(live):
    import ray

    url, root = live
    folder = write_shapes_folder(root / "data", 6, colour="cyan", shape="circle")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path in sorted(folder.iterdir()):
            archive.add(path, path.name)
    with httpx.Client(base_url=url, timeout=60) as client:
        dataset = client.post("/v1/datasets", content=buffer.getvalue(), headers={"Content-Type": "application/gzip"})
        assert dataset.status_code == 201, dataset.text
        config = {"method": "lora", "base": "toy", "max_steps": 150, "batch_size": 2,
                  "data": {"trigger": "sks", "resolution": 32}}
        training = client.post("/v1/trainings", json={"config": config, "dataset": dataset.json()["digest"],
                                                      "publish": {"name": "served-gateway", "aliases": ["prod"]}})
        assert training.status_code == 202, training.text
        training_id = training.json()["id"]
        _wait(client, training_id, lambda r: r["step"] > 0)

        before = _gateway_replicas()
        assert len(before) == 1, before
        ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
        final = _wait(client, training_id, lambda r: r["state"] in ("succeeded", "failed", "cancelled"))
        assert final["state"] == "succeeded", final
        assert _gateway_replicas() != before  # a new replica finished the bookkeeping
        image = client.post("/v1/generate", json={"prompt": "sks a circle", "adapter": "served-gateway:prod",
                                                  "seed": 0})
        assert image.status_code == 200, image.text
