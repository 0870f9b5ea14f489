"""Whether a file is safetensors is decided by parsing it, never by sniffing its first byte."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafleet.registry import PublishRequest
from lorafleet.registry.errors import InvalidAdapter, UnsafeFormat
from lorafleet.registry.safetensors_io import AdapterLimits, load_tensors

_TENSOR = torch.arange(6, dtype=torch.float32).reshape(2, 3)


def _header_bytes(entries: dict, length: int) -> bytes:
    """JSON of ``entries`` padded with spaces (as the safetensors writer pads) to ``length`` bytes."""
    text = json.dumps(entries, separators=(",", ":")).encode()
    assert len(text) <= length
    return text + b" " * (length - len(text))


def _with_header_length(length: int) -> bytes:
    """A valid safetensors file whose JSON header is exactly ``length`` bytes long."""
    entry = {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}
    if len(json.dumps(entry, separators=(",", ":"))) <= length:
        header, data = entry, _TENSOR.numpy().tobytes()
    else:  # too short for a tensor entry: an empty (still valid) file
        header, data = {}, b""
    return struct.pack("<Q", length) + _header_bytes(header, length) + data


def test_every_header_length_from_8_to_4096_bytes_is_read_as_safetensors(tmp_path):
    path = tmp_path / "adapter.safetensors"
    first_bytes = set()
    for length in range(8, 4097):
        data = _with_header_length(length)
        first_bytes.add(data[0])
        path.write_bytes(data)
        tensors, _ = load_tensors(path, AdapterLimits())  # raises on refusal
        if tensors:
            assert torch.equal(tensors["w"], _TENSOR), length
    assert 0x80 in first_bytes  # the lengths that look like a pickle's first byte were among them


def _repadded(source: Path, target: Path, steps: int) -> None:
    """Rewrite a real safetensors file with its metadata padded so that its header length is 128
    modulo 256 (its first byte 0x80), ``steps`` x 256 bytes above the smallest such length."""
    data = source.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header.setdefault("__metadata__", {})["padding"] = ""
    bare = len(json.dumps(header, separators=(",", ":")).encode())
    header_length = bare + (128 - bare) % 256 + 256 * steps
    header["__metadata__"]["padding"] = "x" * (header_length - bare)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) == header_length
    target.write_bytes(struct.pack("<Q", header_length) + text + data[8 + length :])


@pytest.mark.parametrize("steps", [0, 1, 9])
def test_a_plain_diffusers_lora_whose_header_starts_with_0x80_publishes(registry, tiny_spec, diffusers_lora_dir,
                                                                         tmp_path, steps):
    """Plain diffusers wrote a 10,368-byte (0x2880) header for a small SD base in practice."""
    target = tmp_path / "pytorch_lora_weights.safetensors"
    _repadded(diffusers_lora_dir / "pytorch_lora_weights.safetensors", target, steps)
    assert target.read_bytes()[0] == 0x80
    load_file(str(target))  # the safetensors library itself reads it
    manifest = registry.publish(target, PublishRequest(name="padded", base=tiny_spec))
    assert manifest.rank == 4 and manifest.alpha == 8.0


def _pickled(protocol: int) -> bytes:
    return pickle.dumps({"unet.x.lora_A.weight": [[1.0, 2.0]]}, protocol=protocol)


def _torch_zip() -> bytes:
    buffer = io.BytesIO()
    torch.save({"unet.x.lora_A.weight": torch.ones(2, 2)}, buffer)
    data = buffer.getvalue()
    assert zipfile.is_zipfile(io.BytesIO(data))
    return data


REFUSED = {f"pickle-protocol-{p}": _pickled(p) for p in (2, 3, 4, 5)}
REFUSED["torch-zip"] = _torch_zip()
REFUSED.update({f"{name}-truncated": data[: len(data) // 2] for name, data in list(REFUSED.items())})


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_pickle_and_torch_files_named_safetensors_are_still_refused_as_pickle(tmp_path, name):
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(REFUSED[name])
    with pytest.raises(UnsafeFormat, match="pickle"):
        load_tensors(path, AdapterLimits())


def _deep_header() -> bytes:
    raw = b"[" * 199_999 + b"]" * 199_999
    assert len(raw) % 256 != 128  # not a pickle look-alike: this case is about the JSON
    return struct.pack("<Q", len(raw)) + raw


def _huge_integer_header() -> bytes:
    raw = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    raw = raw.replace(b"[1]", b"[" + b"9" * 5000 + b"]")
    return struct.pack("<Q", len(raw)) + raw + b"\0" * 4


def _huge_integer_metadata(spec) -> bytes:
    from safetensors.torch import save

    from lorafleet.synthetic import synthetic_lora

    tensors = synthetic_lora(spec).tensors
    return save(tensors, metadata={"lora_adapter_metadata": "{\"unet.r\": " + "9" * 5000 + "}"})


@pytest.mark.parametrize("make", [_deep_header, _huge_integer_header])
def test_hostile_json_headers_are_invalid_adapters(tmp_path, make):
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(make())
    with pytest.raises(InvalidAdapter, match="not valid JSON"):
        load_tensors(path, AdapterLimits())


def test_hostile_json_in_lora_metadata_is_an_invalid_adapter(registry, tiny_spec, tmp_path):
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(_huge_integer_metadata(tiny_spec))
    with pytest.raises(InvalidAdapter, match="not valid JSON"):
        registry.publish(path, PublishRequest(name="hostile", base=tiny_spec))


def test_the_cli_prints_one_line_for_a_hostile_header(tmp_path, capsys):
    from lorafleet.cli import main

    path = tmp_path / "adapter.safetensors"
    path.write_bytes(_deep_header())
    code = main(["registry", "publish", "--registry", f"file://{tmp_path / 'reg'}", str(path), "--name", "x",
                 "--base", "tiny"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and "not valid JSON" in err
