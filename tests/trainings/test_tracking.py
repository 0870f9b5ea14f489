"""A run's TensorBoard event files, read back by TensorBoard's own reader; an MLflow run with the
mlflow client on a real file store, its id in the published adapter's lineage."""

from __future__ import annotations

import os

import pytest

from lorafleet.devtools.shapes import write_shapes_folder
from lorafleet.registry import AdapterRegistry
from lorafleet.training.config import load_train_config
from lorafleet.training.loop import train
from lorafleet.training.publish import publish_result


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    # MLflow 3 keeps its file store for those who opt in; a server (http://) needs no flag.
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    root = tmp_path_factory.mktemp("tracking")
    data = write_shapes_folder(root / "data", 6, colour="cyan", shape="circle")
    config = load_train_config(None, [f"data.path={data}", f"output_dir={root / 'run'}", "max_steps=8",
                                      "batch_size=2", "data.trigger=sks", "checkpoint_every=4",
                                      "validation_prompts=[sks a circle, a red square]",
                                      f"tracking.mlflow_uri=file://{root / 'mlruns'}"])
    result = train(config)
    manifest = publish_result(result, config, AdapterRegistry(f"file://{root / 'registry'}"), "tracked")
    return config, result, manifest


def test_tensorboard_reads_loss_learning_rate_gradient_norm_and_validation_images(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config, result, _ = tracked_run
    accumulator = EventAccumulator(str(config.output_dir / "tensorboard"), size_guidance={"images": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    assert {"train/loss", "train/learning_rate", "train/grad_norm"} <= set(tags["scalars"])
    losses = accumulator.Scalars("train/loss")
    assert [e.step for e in losses] == list(range(1, 9))
    assert [round(e.value, 5) for e in losses] == [round(v, 5) for v in result.state.losses]
    assert all(e.value > 0 for e in accumulator.Scalars("train/grad_norm"))
    images = [tag for tag in tags["images"] if tag.startswith("validation")]
    assert images, tags["images"]
    steps = sorted({event.step for tag in images for event in accumulator.Images(tag)})
    assert steps == [4, 8]  # the checkpoint's grid and the final one


def test_mlflow_run_holds_the_metrics_and_its_id_is_in_the_lineage(tracked_run):
    from mlflow.tracking import MlflowClient

    config, result, manifest = tracked_run
    run_id = manifest.lineage["mlflow_run_id"]
    client = MlflowClient(tracking_uri=config.tracking.mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["method"] == "lora" and run.data.params["lora.rank"] == str(config.lora.rank)
    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in history] == list(range(1, 9))
    assert "final/loss_final" in run.data.metrics
    artifacts = [a.path for a in client.list_artifacts(run_id, "validation")]
    assert len(artifacts) >= 1 and all(a.endswith(".png") for a in artifacts)
    assert manifest.lineage["tensorboard_dir"].endswith("tensorboard")


def test_a_broken_tracking_backend_never_costs_the_run(tmp_path):
    data = write_shapes_folder(tmp_path / "data", 4, colour="cyan", shape="circle")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where MLflow wants a folder")
    config = load_train_config(None, [f"data.path={data}", f"output_dir={tmp_path / 'run'}", "max_steps=3",
                                      "batch_size=2", f"tracking.mlflow_uri=file://{blocker}/mlruns"])
    result = train(config)
    assert result.state.step == 3 and "mlflow_run_id" not in result.lineage
    assert (tmp_path / "run" / "adapter.safetensors").is_file()
