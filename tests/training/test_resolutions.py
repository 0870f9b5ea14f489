"""Every method at resolutions other than the base's native one (0.5x, 2x, non-square buckets):
the run finishes, its adapter is on disk before any optional report, the end-of-run metrics are
computed at the training size, and the result publishes."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from lorafleet.devtools.shapes import write_shapes_folder
from lorafleet.registry import AdapterRegistry
from lorafleet.training.config import load_train_config
from lorafleet.training.loop import ADAPTER_FILE, train
from lorafleet.training.publish import publish_result

METHODS = {
    "lora": [],
    "dreambooth": ["dreambooth.num_class_images=2", "dreambooth.class_image_steps=2",
                   "dreambooth.class_prompt=a circle"],
    "qlora": [],
    "textual_inversion": ["textual_inversion.token=<sks>", "data.trigger=<sks>", "textual_inversion.init_word=circle"],
    "full": [],
}
RESOLUTIONS = {"native": ["data.resolution=32"], "2x": ["data.resolution=64"], "half": ["data.resolution=16"],
               "buckets": ["data.resolution=48", "data.buckets=true"]}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Square shapes plus landscape and portrait copies (for the aspect-ratio buckets)."""
    folder = write_shapes_folder(tmp_path_factory.mktemp("data"), 4, colour="cyan", shape="circle")
    for index, path in enumerate(sorted(folder.glob("*.png"))[:2]):
        image = Image.open(path).convert("RGB")
        size = (64, 32) if index % 2 == 0 else (32, 64)
        image.resize(size).save(folder / f"wide-{index}.png")
        with open(folder / "metadata.jsonl", "a") as handle:
            handle.write(json.dumps({"file_name": f"wide-{index}.png", "text": "a sks circle"}) + "\n")
    return folder


@pytest.mark.parametrize("resolution", list(RESOLUTIONS))
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_at_other_resolutions_and_keeps_its_result(method, resolution, dataset, tmp_path):
    config = load_train_config(None, [f"method={method}", "base=tiny", f"data.path={dataset}",
                                      f"output_dir={tmp_path / 'run'}", "max_steps=2", "batch_size=2",
                                      "data.trigger=sks", *METHODS[method], *RESOLUTIONS[resolution]])
    result = train(config)
    assert result.state.step == 2
    assert (tmp_path / "run" / ADAPTER_FILE).is_file() and result.artifacts["adapter"].is_file()
    assert "warnings" not in result.metrics, result.metrics["warnings"]
    if resolution != "buckets":  # square latents at the training size exist: the distance is measured
        assert result.metrics["latent_distance_with_adapter"] is not None
    manifest = publish_result(result, config, AdapterRegistry(f"file://{tmp_path / 'registry'}"), "at-size")
    assert manifest.version == 1


def test_a_failing_optional_report_is_a_warning_not_a_lost_run(dataset, tmp_path, monkeypatch):
    from lorafleet.training import loop

    def broken(*args, **kwargs):
        raise RuntimeError("the metric broke")

    monkeypatch.setattr(loop, "latent_distance", broken)
    monkeypatch.setattr(loop, "save_loss_curve", broken)
    config = load_train_config(None, ["method=lora", "base=tiny", f"data.path={dataset}", "data.trigger=sks",
                                      f"output_dir={tmp_path / 'run'}", "max_steps=2", "batch_size=2",
                                      "validation_prompts=['sks a circle']"])
    result = train(config)
    assert any("the metric broke" in w for w in result.metrics["warnings"])
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["warnings"]
    assert (tmp_path / "run" / ADAPTER_FILE).is_file()
    manifest = publish_result(result, config, AdapterRegistry(f"file://{tmp_path / 'registry'}"), "kept")
    assert manifest.version == 1
