"""Bad input: each case gets a precise error and leaves the registry exactly as it was."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import publish_lora, snapshot, write_lora
from safetensors.torch import save_file

from lorafleet.registry import PublishRequest
from lorafleet.registry.errors import (
    AdapterIncompatible,
    AdapterTooLarge,
    AliasNotFound,
    InvalidAdapter,
    InvalidName,
    InvalidReference,
    UnsafeFormat,
)
from lorafleet.registry.payload import LORAFLEET_METADATA_KEY
from lorafleet.registry.safetensors_io import AdapterLimits
from lorafleet.synthetic import synthetic_lora


def _pickle_bin(d: Path, spec) -> Path:
    path = d / "pytorch_lora_weights.bin"
    torch.save(synthetic_lora(spec).tensors, path)
    return path


def _pickle_disguised(d: Path, spec) -> Path:
    path = d / "adapter.safetensors"
    torch.save(synthetic_lora(spec).tensors, path)
    return path


def _truncated(d: Path, spec) -> Path:
    path = write_lora(d, spec)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _wrong_shapes(d: Path, spec) -> Path:
    payload = synthetic_lora(spec)
    for key in list(payload.tensors)[:2]:
        payload.tensors[key] = torch.ones(3, 5)
    path = d / "wrong.safetensors"
    path.write_bytes(payload.to_bytes())
    return path


def _other_base(d: Path, spec) -> Path:
    """A LoRA for a bigger base: module names exist in SD 1.5 but not in tiny, wider layers."""
    tensors = {
        "unet.down_blocks.3.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(4, 1280),
        "unet.down_blocks.3.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(1280, 4),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(4, 320),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(320, 4),
    }
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 4,
                "unet.target_modules": ["to_q"]})}
    path = d / "sd15.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def _other_base_fingerprint(d: Path, spec) -> Path:
    path = d / "foreign.safetensors"
    path.write_bytes(synthetic_lora(spec).to_bytes({"base_fingerprint": "sha256:" + "ab" * 32}))
    return path


def _no_lora_config(d: Path, spec) -> Path:
    path = d / "noconfig.safetensors"
    save_file(synthetic_lora(spec).tensors, str(path))
    return path


def _zero_update(d: Path, spec) -> Path:
    payload = synthetic_lora(spec)
    for key in payload.tensors:
        if key.endswith("lora_B.weight"):
            payload.tensors[key] = torch.zeros_like(payload.tensors[key])
    path = d / "zero.safetensors"
    path.write_bytes(payload.to_bytes())
    return path


def _nan_values(d: Path, spec) -> Path:
    payload = synthetic_lora(spec)
    key = next(iter(payload.tensors))
    payload.tensors[key][0, 0] = float("nan")
    path = d / "nan.safetensors"
    path.write_bytes(payload.to_bytes())
    return path


def _huge_header_claim(d: Path, spec) -> Path:
    header = {"unet.x.lora_A.weight": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 1 << 42]}}
    raw = json.dumps(header).encode()
    path = d / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 64)
    return path


def _header_length_lie(d: Path, spec) -> Path:
    path = d / "lie.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    return path


def _empty_file(d: Path, spec) -> Path:
    path = d / "empty.safetensors"
    save_file({}, str(path))
    return path


def _unknown_layout(d: Path, spec) -> Path:
    path = d / "weird.safetensors"
    save_file({"model.layer.weight": torch.ones(4, 4), "model.layer.bias": torch.ones(4)}, str(path))
    return path


def _malformed_lora_metadata(d: Path, spec) -> Path:
    path = d / "badmeta.safetensors"
    save_file(synthetic_lora(spec).tensors, str(path), metadata={"lora_adapter_metadata": "{not json"})
    return path


def _missing_file(d: Path, spec) -> Path:
    return d / "does-not-exist.safetensors"


FILE_CASES = [
    (_pickle_bin, UnsafeFormat, "pickle"),
    (_pickle_disguised, UnsafeFormat, "pickle"),
    (_truncated, InvalidAdapter, "truncated"),
    (_wrong_shapes, AdapterIncompatible, "shape"),
    (_other_base, AdapterIncompatible, "no linear or conv module"),
    (_other_base_fingerprint, AdapterIncompatible, "made for base"),
    (_no_lora_config, InvalidAdapter, "alpha"),
    (_zero_update, InvalidAdapter, "change nothing"),
    (_nan_values, InvalidAdapter, "NaN"),
    (_huge_header_claim, InvalidAdapter, "claims"),
    (_header_length_lie, InvalidAdapter, "header length"),
    (_empty_file, InvalidAdapter, "no tensors"),
    (_unknown_layout, InvalidAdapter, "unrecognised adapter layout"),
    (_malformed_lora_metadata, InvalidAdapter, "not valid JSON"),
    (_missing_file, InvalidAdapter, "does not exist"),
]


@pytest.mark.parametrize("make_file, error, words", FILE_CASES, ids=[c[0].__name__.strip("_") for c in FILE_CASES])
def test_bad_adapter_files_are_refused_and_nothing_is_stored(registry, tiny_spec, tmp_path, make_file, error, words):
    publish_lora(registry, tiny_spec, tmp_path, name="existing", aliases=["prod"])
    before = snapshot(registry)
    (tmp_path / "bad").mkdir()
    path = make_file(tmp_path / "bad", tiny_spec)
    with pytest.raises(error) as caught:
        registry.publish(path, PublishRequest(name="existing", base=tiny_spec))
    assert words.lower() in str(caught.value).lower()
    assert snapshot(registry) == before


def test_wrong_shapes_are_all_reported_at_once(registry, tiny_spec, tmp_path):
    (tmp_path / "bad").mkdir()
    with pytest.raises(AdapterIncompatible) as caught:
        registry.publish(_wrong_shapes(tmp_path / "bad", tiny_spec), PublishRequest(name="x", base=tiny_spec))
    assert len(caught.value.problems) >= 2


BAD_NAMES = ["", "Bad", "has space", "../escape", "a/b", "..", "-lead", "x" * 65, "name\x00", "é"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused(registry, tiny_spec, tmp_path, name):
    path = write_lora(tmp_path, tiny_spec)
    with pytest.raises(InvalidName):
        registry.publish(path, PublishRequest(name=name, base=tiny_spec))
    assert snapshot(registry) == {}


@pytest.mark.parametrize("alias", ["latest", "Prod", "../x", "1abc", ""])
def test_bad_aliases_on_publish_store_nothing(registry, tiny_spec, tmp_path, alias):
    path = write_lora(tmp_path, tiny_spec)
    with pytest.raises(InvalidName):
        registry.publish(path, PublishRequest(name="ok", base=tiny_spec, aliases=[alias]))
    assert snapshot(registry) == {}


@pytest.mark.parametrize("ref", ["", "style@", "style@0", "style@-1", "style@1.5", "style@sha256:xyz",
                                 "../etc@1", "style:../x", "style@99999999999", "a" * 300])
def test_bad_references_are_refused(registry, ref):
    with pytest.raises((InvalidReference, InvalidName)):
        registry.resolve(ref)


def test_missing_alias_is_not_found(registry, tiny_spec, tmp_path):
    publish_lora(registry, tiny_spec, tmp_path)
    with pytest.raises(AliasNotFound):
        registry.resolve("style:canary")


def test_size_limits_are_enforced(tmp_path, tiny_spec):
    from lorafleet.registry import AdapterRegistry

    registry = AdapterRegistry(f"file://{tmp_path / 'reg'}", limits=AdapterLimits(max_file_bytes=1024))
    with pytest.raises(AdapterTooLarge):
        registry.publish(write_lora(tmp_path, tiny_spec), PublishRequest(name="big", base=tiny_spec))
    assert snapshot(registry) == {}


_READ_ONLY_PUBLISH = textwrap.dedent(
    """
    import sys, pathlib
    from lorafleet.bases import base_spec
    from lorafleet.registry import AdapterRegistry, PublishRequest
    from lorafleet.registry.errors import RegistryReadOnly
    try:
        AdapterRegistry(sys.argv[1]).publish(pathlib.Path(sys.argv[2]), PublishRequest(name="ro", base=base_spec("tiny")))
    except RegistryReadOnly as exc:
        print("READ-ONLY:", exc)
        sys.exit(3)
    """
)


def test_publishing_to_a_read_only_directory_fails_cleanly(tmp_path, tiny_spec):
    """As root, permissions do not stop writes: the publisher runs without root's capabilities."""
    from lorafleet.registry import AdapterRegistry

    root = tmp_path / "registry"
    registry = AdapterRegistry(f"file://{root}")
    publish_lora(registry, tiny_spec, tmp_path, name="existing")
    before = snapshot(registry)
    source = write_lora(tmp_path / "src", tiny_spec, seed=3)
    os.chmod(tmp_path, 0o755)
    os.chmod(source.parent, 0o755)
    os.chmod(source, 0o644)
    for directory in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        os.chmod(directory, 0o555)
    drop_root_powers = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all", "--"]
    prefix = drop_root_powers if os.geteuid() == 0 else []
    result = subprocess.run(prefix + [sys.executable, "-c", _READ_ONLY_PUBLISH, registry.uri, str(source)],
                            capture_output=True, text=True, timeout=120)
    for directory in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        os.chmod(directory, 0o755)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "not writable" in result.stdout or "read-only" in result.stdout
    assert snapshot(registry) == before


def test_lorafleet_metadata_is_what_the_registry_writes(registry, tiny_spec, tmp_path):
    """Published files carry the base fingerprint, so a pulled file is refused by another base."""
    manifest = publish_lora(registry, tiny_spec, tmp_path)
    data = registry.read_blob(manifest)
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    assert json.loads(header["__metadata__"][LORAFLEET_METADATA_KEY])["base_fingerprint"] == tiny_spec.fingerprint
