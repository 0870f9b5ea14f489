"""`lorafleet bench trainings`: from data to the first image served with the new adapter, on `toy`,
through the training service's API vs through the CLI, in interleaved rounds.

API:  upload the demo dataset (tar.gz) -> POST /v1/trainings -> poll until succeeded -> generate.
CLI:  `lorafleet train CONFIG --publish NAME` (in its own process) -> generate.
Both generate through the same server; both train the README's demo LoRA on the demo's 16
images. Overhead = wall time minus the run's own training time (its `seconds`).
"""

from __future__ import annotations

# Imports inside functions: every benchmark's arguments are added when the parser is built; its
# heavy imports wait for its run.
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from lorafleet.text_table import format_table

from . import positive_int


def _demo_config(workdir: Path) -> tuple[Path, dict]:
    from lorafleet.toyworld.concepts import TRIGGER, concept_dataset, concept_train_config

    data, _ = concept_dataset(workdir / "data", "colour")
    config = concept_train_config("lora", data, workdir / "run", concept="colour", trigger=TRIGGER, seed=0,
                                  base="toy", resolution=32)
    return data, config.model_dump(mode="json", exclude={"output_dir"})


def _tar_gz(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path in sorted(folder.iterdir()):
            archive.add(path, path.name)
    return buffer.getvalue()


def _first_image(client: httpx.Client, adapter: str) -> None:
    response = client.post("/v1/generate", json={"prompt": "sks circle", "adapter": adapter, "seed": 0})
    response.raise_for_status()


def _through_api(client: httpx.Client, data: Path, config: dict, name: str) -> dict:
    started = time.perf_counter()
    report = client.post("/v1/datasets", content=_tar_gz(data), headers={"Content-Type": "application/gzip"})
    report.raise_for_status()
    tree = {**config, "data": {k: v for k, v in config["data"].items() if k != "path"}}
    training = client.post("/v1/trainings", json={"config": tree, "dataset": report.json()["digest"],
                                                  "publish": {"name": name}})
    training.raise_for_status()
    while True:
        record = client.get(f"/v1/trainings/{training.json()['id']}").json()
        if record["state"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.2)
    if record["state"] != "succeeded":
        raise RuntimeError(f"the API training {record['state']}: {record.get('error')}")
    _first_image(client, f"{name}@1")
    return {"total_s": time.perf_counter() - started, "train_s": record["seconds"]}


def _through_cli(client: httpx.Client, config: dict, workdir: Path, registry: str, name: str) -> dict:
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump({**config, "output_dir": str(workdir / name)}))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lorafleet.cli", "train", str(config_path), "--publish", name,
                    "--registry", registry], check=True, capture_output=True, text=True)
    _first_image(client, f"{name}@1")
    total = time.perf_counter() - started
    metrics = json.loads((workdir / name / "metrics.json").read_text())
    return {"total_s": total, "train_s": metrics["seconds"]}


def run(rounds: int) -> list[dict]:
    import ray

    from lorafleet.local_cluster import free_port
    from lorafleet.serve.server import serving_in_thread
    from lorafleet.serve.settings import load_settings
    from lorafleet.training.ray_job import _local_cluster

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lorafleet-bench-trainings-") as folder:
        workdir = Path(folder)
        data, config = _demo_config(workdir)
        registry = f"file://{workdir / 'registry'}"
        address = _local_cluster()
        try:
            settings = load_settings(base="toy", registry=registry, port=free_port(),
                                     trainings={"ray_address": address, "poll_s": 0.2})
            with serving_in_thread(settings) as url, httpx.Client(base_url=url, timeout=600) as client:
                for index in range(rounds):  # interleaved: API then CLI, CLI then API
                    order = ("api", "cli") if index % 2 == 0 else ("cli", "api")
                    for path in order:
                        name = f"bench-{path}-{index}"
                        figures = (_through_api(client, data, config, name) if path == "api"
                                   else _through_cli(client, config, workdir, registry, name))
                        rows.append({"round": index + 1, "path": path, **figures})
        finally:
            ray.shutdown()
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    table = []
    for path in ("cli", "api"):
        mine = [r for r in rows if r["path"] == path]
        total = sum(r["total_s"] for r in mine) / len(mine)
        train = sum(r["train_s"] for r in mine) / len(mine)
        table.append({"path": path, "rounds": len(mine), "data to first image s": round(total, 1),
                      "training s": round(train, 1), "overhead s": round(total - train, 1),
                      "overhead / training": f"{(total - train) / train:.0%}"})
    return table


def cmd_bench_trainings(args) -> int:
    rows = run(args.rounds)
    table = summarize(rows)
    print(format_table(table))
    api, cli = table[1], table[0]
    print(f"API vs CLI, data to first image: {api['data to first image s'] / cli['data to first image s']:.2f}x")
    print(json.dumps({"rounds": rows, "summary": table}, indent=2))
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("--rounds", type=positive_int, default=2, help="interleaved rounds (each: API and CLI)")
    parser.set_defaults(handler=cmd_bench_trainings)
