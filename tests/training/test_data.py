"""Training data: captions, triggers, bad files skipped and reported, preprocessing."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
from PIL import Image

from lorafleet.devtools.shapes import write_shapes_folder
from lorafleet.training.config import DataConfig
from lorafleet.training.data import open_image, prepare_folder, scan
from lorafleet.training.errors import TrainingInputInvalid


def _huge_png(path):
    """A valid PNG header claiming 100000 x 100000 pixels: a decompression bomb."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


def test_sidecar_and_jsonl_captions_with_trigger(tmp_path):
    write_shapes_folder(tmp_path / "a", 3, captions="sidecar")
    write_shapes_folder(tmp_path / "b", 3, captions="jsonl", shape="square")
    examples, _ = scan(DataConfig(path=tmp_path / "a", trigger="sks"))
    assert [e.caption for e in examples] == ["sks a red circle"] * 3
    examples, _ = scan(DataConfig(path=tmp_path / "b"))
    assert {e.caption for e in examples} == {"a red square"}


def test_substitute_trigger(tmp_path):
    write_shapes_folder(tmp_path, 1)
    (tmp_path / "circle-000.txt").write_text("a photo of [trigger] circle")
    examples, _ = scan(DataConfig(path=tmp_path, trigger="sks", trigger_mode="substitute"))
    assert examples[0].caption == "a photo of sks circle"


def test_bad_files_are_skipped_and_reported_never_a_crash(tmp_path):
    write_shapes_folder(tmp_path, 3)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really an image")
    (tmp_path / "copy.png").write_bytes((tmp_path / "circle-000.png").read_bytes())
    Image.new("RGB", (4, 4)).save(tmp_path / "tiny.png")
    _huge_png(tmp_path / "bomb.png")
    Image.new("RGB", (48, 20), (9, 9, 9)).save(tmp_path / "uncaptioned.webp")
    examples, report = scan(DataConfig(path=tmp_path, min_size=8))
    assert report.kept == len(examples) == 4
    assert report.skipped == {"unreadable": ["broken.png"], "too_small": ["tiny.png"], "too_large": ["bomb.png"],
                              "duplicate": ["copy.png"], "not_a_regular_file": []}
    assert report.missing_captions == ["uncaptioned.webp"]
    assert report.caption_words["max"] == 3 and report.captions_outside_recommended == 4
    assert report.dataset_digest.startswith("sha256:")


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(TrainingInputInvalid, match="does not exist"):
        scan(DataConfig(path=tmp_path / "nope"))
    examples, report = scan(DataConfig(path=tmp_path))
    assert examples == [] and report.kept == 0


def test_bad_metadata_jsonl_names_the_line(tmp_path):
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{"oops": 1}\n')
    with pytest.raises(TrainingInputInvalid, match="line 2"):
        scan(DataConfig(path=tmp_path))


def test_exif_orientation_is_honoured(tmp_path):
    image = Image.new("RGB", (16, 32), (200, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert open_image(tmp_path / "rotated.jpg").size == (32, 16)


def test_prepare_writes_square_images_captions_and_report(tmp_path):
    write_shapes_folder(tmp_path / "in", 2, size=40)
    Image.new("RGB", (80, 30), (1, 2, 3)).save(tmp_path / "in" / "wide.png")
    (tmp_path / "in" / "wide.txt").write_text("a wide picture")
    report = prepare_folder(DataConfig(path=tmp_path / "in", resolution=24), tmp_path / "out")
    outputs = sorted((tmp_path / "out").glob("*.png"))
    assert len(outputs) == 3 and all(Image.open(p).size == (24, 24) for p in outputs)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["kept"] == 3
    assert report.resized == 3


def test_buckets_group_by_aspect_and_weights_steer_sampling(tmp_path):
    import torch

    from lorafleet.bases import load_base
    from lorafleet.training.batches import BatchSource
    from lorafleet.training.config import load_train_config
    from lorafleet.training.data import bucket_for

    assert bucket_for(1.0, 32) == (32, 32) and bucket_for(2.0, 32) == (40, 24) and bucket_for(0.5, 32) == (24, 40)
    rows = []
    for index, (size, weight) in enumerate([((48, 32), 1.0), ((32, 48), 1.0), ((32, 32), 50.0)]):
        name = f"img{index}.png"
        Image.new("RGB", size, (index * 80, 20, 20)).save(tmp_path / name)
        rows.append(json.dumps({"file_name": name, "text": f"picture {index}", "weight": weight}))
    (tmp_path / "metadata.jsonl").write_text("\n".join(rows))
    config = load_train_config(None, [f"data.path={tmp_path}", "base=tiny", "data.buckets=true", "batch_size=2"])
    examples, _ = scan(config.data)
    source = BatchSource(load_base("tiny").pipeline, examples, config, torch.device("cpu"))
    assert sorted(g.size for g in source.groups) == [(24, 40), (32, 32), (40, 24)]
    captions = [c for step in range(40) for c in source.batch(step, 0).captions]
    assert captions.count("picture 2") > 0.8 * len(captions)  # weight 50 of 52
    assert {tuple(g.latents.shape[2:]) for g in source.groups} == {(8, 8), (6, 10), (10, 6)}  # [h/4, w/4]
    sizes = {tuple(source.batch(step, 0).latents.shape[2:]) for step in range(200)}
    assert len(sizes) >= 2  # batches come from more than one bucket, each batch from one


def test_bad_weights_are_refused_naming_the_line(tmp_path):
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x", "weight": -2}\n')
    with pytest.raises(TrainingInputInvalid, match="line 1: weight"):
        scan(DataConfig(path=tmp_path))


def _eps_named_png(path):
    """An EPS file (Pillow would hand it to Ghostscript) with a .png name."""
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\nnewpath 0 0 moveto 32 32 lineto stroke\n"
                     b"showpage\n%%EOF\n")


def test_hostile_files_are_skipped_and_reported_never_read(tmp_path):
    """Symlinks (to secrets), FIFOs, other formats behind an image suffix, oversized files."""
    import os
    import subprocess
    import sys

    folder = write_shapes_folder(tmp_path / "data", 3, captions="sidecar")
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:the secret")
    first = sorted(folder.glob("*.png"))[0]
    first.with_suffix(".txt").unlink()
    os.symlink(secret, first.with_suffix(".txt"))  # a caption linked to a secret file
    os.symlink(first, folder / "linked.png")  # an image symlink
    os.mkfifo(folder / "x.png")  # would block a plain open() forever
    _eps_named_png(folder / "vector.png")
    (folder / "big.png").write_bytes(b"\x89PNG" + b"\0" * 4096)
    out = tmp_path / "prepared"
    command = [sys.executable, "-m", "lorafleet.cli", "data", "prepare", str(folder), "--out", str(out),
               "--max-file-bytes", "2048", "--resolution", "32"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    skipped = report["skipped"]
    assert sorted(skipped["not_a_regular_file"]) == sorted([first.with_suffix(".txt").name, "linked.png", "x.png"])
    assert skipped["unreadable"] == ["vector.png"] and skipped["too_large"] == ["big.png"]
    assert report["kept"] == 3
    for caption in out.glob("*.txt"):
        assert "the secret" not in caption.read_text()


def test_a_symlinked_metadata_file_is_refused(tmp_path):
    folder = write_shapes_folder(tmp_path / "data", 2, captions="none")
    (tmp_path / "elsewhere.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "y"}) + "\n")
    import os

    os.symlink(tmp_path / "elsewhere.jsonl", folder / "metadata.jsonl")
    with pytest.raises(TrainingInputInvalid, match="not a regular file"):
        scan(DataConfig(path=folder))


def test_each_image_records_its_original_size_and_crop_for_sdxl():
    """SDXL's add_time_ids: (original height, width, crop top, left, target height, width), as
    diffusers' SDXL training scripts record them; a random crop records the offset it drew."""
    import random

    from PIL import Image

    from lorafleet.training.data import resize_and_crop_recorded

    wide = Image.new("RGB", (64, 48))
    image, ids = resize_and_crop_recorded(wide, 32, "center", random.Random(0))
    assert image.size == (32, 32) and ids == (48, 64, 0, 5, 32, 32)  # resized to 43x32, 11 px spare
    tall = Image.new("RGB", (40, 80))
    offsets = {resize_and_crop_recorded(tall, (16, 24), "random", random.Random(seed))[1] for seed in range(20)}
    assert {ids[:2] for ids in offsets} == {(80, 40)} and {ids[4:] for ids in offsets} == {(24, 16)}
    assert {ids[3] for ids in offsets} == {0} and len({ids[2] for ids in offsets}) > 1  # 32 px tall: 8 spare rows
