"""The `lorafleet` command as users run it: real subprocesses, JSON output, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_lora

LORAFLEET = [sys.executable, "-m", "lorafleet.cli"]


def run(*args: str, check: bool = True, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    result = subprocess.run(LORAFLEET + list(args), capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_registry_commands_end_to_end(registry_uri, tiny_spec, tmp_path):
    first = write_lora(tmp_path / "a", tiny_spec, seed=1)
    second = write_lora(tmp_path / "b", tiny_spec, seed=2)
    reg = ["--registry", registry_uri, "--json"]
    published = json.loads(run("registry", "publish", str(first), "--name", "style", "--alias", "prod", *reg).stdout)
    assert published["version"] == 1 and published["base"]["id"] == "tiny"
    assert json.loads(run("registry", "publish", str(second), "--name", "style", *reg).stdout)["version"] == 2
    listing = json.loads(run("registry", "list", "style", *reg).stdout)
    assert [v["version"] for v in listing["versions"]] == [1, 2] and listing["aliases"] == {"prod": 1}
    assert json.loads(run("registry", "show", "style:prod", *reg).stdout)["version"] == 1
    run("registry", "alias", "style", "prod", "2", "--expect", "1", *reg)
    assert json.loads(run("registry", "show", "style:prod", *reg).stdout)["version"] == 2
    pulled = json.loads(run("registry", "pull", "style@1", str(tmp_path / "out"), *reg).stdout)
    assert Path(pulled["path"]).is_file()
    assert json.loads(run("registry", "yank", "style@2", "--reason", "bad", *reg).stdout)["yanked"] is True
    assert json.loads(run("registry", "show", "style", *reg).stdout)["version"] == 1
    exported = json.loads(run("registry", "export", "style@1", str(tmp_path / "k.safetensors"), *reg).stdout)
    assert Path(exported["path"]).is_file()
    assert json.loads(run("registry", "gc", "--grace-seconds", "0", *reg).stdout)["removed"] == []
    human = run("registry", "list", "--registry", registry_uri).stdout
    assert "style@1" in human


@pytest.mark.parametrize("args, message", [
    (["registry", "show", "nothing-here"], "no adapter named"),
    (["registry", "show", "Bad Name"], "invalid"),
    (["registry", "publish", "/does/not/exist.safetensors", "--name", "x"], "does not exist"),
    (["registry", "alias", "nothing", "prod", "1"], "does not exist"),
    (["registry", "list", "--registry", "ftp://host/x"], "unknown registry scheme"),
])
def test_errors_exit_non_zero_with_one_clear_message(tmp_path, args, message):
    if "--registry" not in args:
        args = args + ["--registry", f"file://{tmp_path / 'reg'}"]
    result = run(*args, check=False)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_json_errors_name_the_field(tmp_path):
    result = run("registry", "show", "style@0", "--registry", f"file://{tmp_path}", "--json", check=False)
    assert result.returncode == 1
    assert json.loads(result.stdout)["error"]["field"] == "ref"


def test_publish_of_a_pickle_file_is_refused(tmp_path, tiny_spec):
    import torch

    from lorafleet.synthetic import synthetic_lora

    torch.save(synthetic_lora(tiny_spec).tensors, tmp_path / "pytorch_lora_weights.bin")
    result = run("registry", "publish", str(tmp_path / "pytorch_lora_weights.bin"), "--name", "x",
                 "--registry", f"file://{tmp_path / 'reg'}", check=False)
    assert result.returncode == 1 and "pickle" in result.stderr
    assert not (tmp_path / "reg" / "manifests").exists()


def test_base_export_writes_a_diffusers_directory(tmp_path):
    info = json.loads(run("base", "export", "tiny", str(tmp_path / "tiny"), "--json").stdout)
    assert (tmp_path / "tiny" / "model_index.json").is_file()
    assert run("base", "fingerprint", str(tmp_path / "tiny")).stdout.strip() == info["fingerprint"]


@pytest.mark.slow
def test_demo_trains_publishes_serves_and_saves_a_grid(tmp_path):
    from PIL import Image

    out = run("demo", "--registry", f"file://{tmp_path / 'reg'}", "--out", str(tmp_path / "out"),
              "--images", "2", timeout=600).stdout  # trains a LoRA, starts Ray, generates 28 images
    assert "published demo-cyan@1" in out and "demo-cyan:prod" in out and "server ready at" in out
    grid = tmp_path / "out" / "demo-grid.png"
    assert str(grid) in out and "with adapter" in out and "a sks circle" in out
    rows = 3 + 4  # the concept's prompts, then the base's own
    assert Image.open(grid).size == (4 * 4 * 34, 4 * rows * 34)


@pytest.mark.parametrize(("args", "message"), [(["serve", "--rounds", "0"], "must be at least 1"),
                                               (["serve", "--requests", "many"], "is not an integer"),
                                               (["train", "--steps", "-3"], "must be at least 1")])
def test_bench_counts_are_checked_before_anything_runs(args, message):
    result = run("bench", *args, check=False, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr


@pytest.mark.parametrize("family", ["sd1", "sdxl", "flux", "sd3"])
def test_print_config_gives_a_valid_config_per_family(family, tmp_path):
    """`train --print-config METHOD --family F` prints a config that loads, on that family's example base,
    with the resolution scaled to it; `--base` takes the family and the size from the base itself."""
    import yaml

    from lorafleet.families import family_named
    from lorafleet.training.config import load_train_config

    expected = family_named(family)
    for method in ("lora", "dreambooth", "qlora", "textual_inversion", "full"):
        result = run("train", "--print-config", method, "--family", family, check=False)
        if method == "textual_inversion" and not expected.textual_inversion:
            assert result.returncode != 0 and "load no textual-inversion" in result.stderr, result.stderr
            continue
        (tmp_path / "c.yaml").write_text(result.stdout)
        config = load_train_config(tmp_path / "c.yaml")
        assert config.method.value == method and config.data.resolution == expected.example_resolution
        assert ("flow_matching:" in result.stdout) == (expected.objective == "flow_matching")
    assert config.base == expected.example_base
    assert (f"1024 on a real {expected.title} base" in result.stdout) == (family != "sd1")
    by_base = yaml.safe_load(run("train", "--print-config", "lora", "--base", "tiny-sdxl").stdout)
    assert by_base["base"] == "tiny-sdxl" and by_base["data"]["resolution"] == 32 and by_base["lora"]["rank"] == 16
