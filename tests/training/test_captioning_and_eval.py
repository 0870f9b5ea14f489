"""Auto-captioning with a local BLIP model, and the CLIP score with a local CLIP model."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lorafleet.devtools.shapes import write_shapes_folder
from lorafleet.devtools.tiny_models import build_tiny_blip, build_tiny_clip
from lorafleet.errors import BaseModelError
from lorafleet.training.captioning import caption_folder


def test_captions_are_written_only_where_missing(tmp_path):
    model = build_tiny_blip(tmp_path / "blip")
    folder = write_shapes_folder(tmp_path / "images", 3)
    (folder / "circle-000.txt").unlink()
    (folder / "circle-001.txt").unlink()
    (folder / "broken.png").write_bytes(b"nope")
    report = caption_folder(folder, model)
    assert report.written == ["circle-000.png", "circle-001.png"]
    assert report.kept_existing == ["circle-002.png"] and report.unreadable == ["broken.png"]
    assert (folder / "circle-002.txt").read_text() == "a red circle"
    assert (folder / "circle-000.txt").exists()
    again = caption_folder(folder, model, overwrite=True)
    assert len(again.written) == 3


def test_caption_cli_and_missing_model(tmp_path):
    model = build_tiny_blip(tmp_path / "blip")
    folder = write_shapes_folder(tmp_path / "images", 2, captions="none")
    result = subprocess.run([sys.executable, "-m", "lorafleet.cli", "data", "caption", str(folder), "--model",
                             str(model)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "captioned 2 images" in result.stdout
    with pytest.raises(BaseModelError, match="not a local folder"):
        caption_folder(folder, tmp_path / "no-model")


def test_clip_score_is_recorded_with_a_local_clip_model(tmp_path):
    from lorafleet.training.config import load_train_config
    from lorafleet.training.loop import train

    clip = build_tiny_clip(tmp_path / "clip")
    data = write_shapes_folder(tmp_path / "data", 4)
    config = load_train_config(None, [f"data.path={data}", f"output_dir={tmp_path / 'run'}", "max_steps=2",
                                      "validation_prompts=['a red circle']", f"clip_model={clip}"])
    score = train(config).metrics["clip_score"]
    assert isinstance(score, float) and score >= 0
