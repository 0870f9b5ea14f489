"""Reading adapter files safely: safetensors only, header checked before any tensor is read.

Pickle-based formats (.bin/.pt/.ckpt...) can execute code when loaded: they are refused by
suffix and by content. A safetensors header is parsed and bounds-checked by us first, so a file
that claims huge tensors or offsets past its end is refused before allocation.
"""

from __future__ import annotations

# Imports inside functions: torch only when tensors are loaded: the header checks run without it.
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field

from .errors import AdapterTooLarge, InvalidAdapter, UnsafeFormat

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".npy", ".npz"})
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


class AdapterLimits(BaseModel):
    """Size limits applied to every adapter file before it is read."""

    max_file_bytes: int = Field(2 * 1024**3, description="Largest adapter file accepted.")
    max_header_bytes: int = Field(16 * 1024**2, description="Largest safetensors JSON header.")
    max_tensors: int = Field(20_000, description="Most tensors in one adapter file.")
    max_rank: int = Field(1024, description="Highest LoRA rank accepted.")


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def refuse_pickle_suffix(path: Path) -> None:
    """Refuse files named as pickle-based formats before reading a byte of them."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeFormat(
            f"{path.name}: pickle-based weight files ({path.suffix}) are refused because loading them "
            "can run arbitrary code; convert the adapter to .safetensors",
            field="path",
        )


def _looks_like_pickle(path: Path) -> bool:
    """Pickle (protocol 2+) or torch.save zip magic. Only asked once a file failed to parse as
    safetensors: a valid safetensors file may start with 0x80 too (header length 128 mod 256)."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _explain_unparsable(path: Path, error: InvalidAdapter) -> InvalidAdapter | UnsafeFormat:
    if not _looks_like_pickle(path):
        return error
    return UnsafeFormat(
        f"{path.name}: this is a pickle/torch.save file, not safetensors; refused (convert it to "
        ".safetensors)",
        field="path",
    )


def _parse_entry(name: str, entry: object, data_length: int) -> TensorInfo:
    if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPE_BYTES:
        raise InvalidAdapter(f"safetensors header: tensor {name!r} has an unknown dtype", field="path")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise InvalidAdapter(f"safetensors header: tensor {name!r} has an invalid shape", field="path")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise InvalidAdapter(f"safetensors header: tensor {name!r} has invalid offsets", field="path")
    begin, end = offsets
    expected = math.prod(shape) * _DTYPE_BYTES[entry["dtype"]]
    if not 0 <= begin <= end <= data_length or end - begin != expected:
        raise InvalidAdapter(
            f"safetensors header: tensor {name!r} claims {expected} bytes at {offsets}, "
            f"but the file holds {data_length} bytes of data (truncated or corrupt file)",
            field="path",
        )
    return TensorInfo(entry["dtype"], tuple(shape))


class UntrustedJsonError(ValueError):
    """JSON from outside that cannot be parsed safely; the message says why."""


def parse_untrusted_json(raw: bytes | str) -> object:
    """json.loads for input we did not write: hostile JSON (deep nesting, integers past Python's
    digit limit, bad encodings) raises UntrustedJsonError instead of RecursionError/ValueError."""
    try:
        return json.loads(raw)
    except RecursionError as exc:
        raise UntrustedJsonError("nested too deeply") from exc
    except UnicodeDecodeError as exc:
        raise UntrustedJsonError("not UTF-8 text") from exc
    except ValueError as exc:  # JSONDecodeError, and integers past the digit limit
        raise UntrustedJsonError(str(exc).split("; use sys.set_int_max_str_digits")[0]) from exc


def _parse_header_json(path: Path, raw: bytes) -> object:
    try:
        return parse_untrusted_json(raw)
    except UntrustedJsonError as exc:
        raise InvalidAdapter(f"{path.name}: safetensors header is not valid JSON ({exc})", field="path") from exc


def _header_object(path: Path, limits: AdapterLimits) -> tuple[dict, int]:
    """The header's JSON object and the length of the data section after it."""
    size = path.stat().st_size
    if size > limits.max_file_bytes:
        raise AdapterTooLarge(f"{path.name} is {size} bytes; the limit is {limits.max_file_bytes}", field="path")
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise InvalidAdapter(f"{path.name} is truncated: not a safetensors file", field="path")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > limits.max_header_bytes or 8 + header_length > size:
            raise InvalidAdapter(
                f"{path.name}: safetensors header length {header_length} is invalid for a file of "
                f"{size} bytes (truncated or not safetensors)",
                field="path",
            )
        raw = handle.read(header_length)
    header = _parse_header_json(path, raw)
    if not isinstance(header, dict):
        raise InvalidAdapter(f"{path.name}: safetensors header is not a JSON object", field="path")
    return header, size - 8 - header_length


def read_header(path: Path, limits: AdapterLimits) -> SafetensorsHeader:
    """The checked header. A file is safetensors when this parses it, whatever its first byte;
    pickle and zip magic only explain why a file that does not parse is refused."""
    try:
        header, data_length = _header_object(path, limits)
    except InvalidAdapter as exc:
        raise _explain_unparsable(path, exc) from exc
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidAdapter(f"{path.name}: safetensors metadata must map strings to strings", field="path")
    if len(header) > limits.max_tensors:
        raise AdapterTooLarge(f"{path.name} holds {len(header)} tensors; the limit is {limits.max_tensors}")
    tensors = {name: _parse_entry(name, entry, data_length) for name, entry in header.items()}
    return SafetensorsHeader(tensors=tensors, metadata=metadata)


def load_tensors(path: Path, limits: AdapterLimits) -> tuple[dict, dict[str, str]]:
    """Every tensor of a checked safetensors file, and its string metadata."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    refuse_pickle_suffix(path)
    header = read_header(path, limits)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InvalidAdapter(f"{path.name}: cannot read safetensors data: {exc}", field="path") from exc
    non_finite = [
        name for name, info in header.tensors.items()
        if info.dtype in _FLOAT_DTYPES and not torch.isfinite(tensors[name]).all()
    ]
    if non_finite:
        raise InvalidAdapter(
            f"{path.name}: tensors contain NaN or infinite values", field="path", problems=non_finite[:20]
        )
    return tensors, header.metadata


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its header written in a fixed order.

    The safetensors writer orders metadata entries differently from run to run; identical
    adapters must give identical bytes (and so one digest).
    """
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    ordered = {k: header[k] for k in sorted(header)}
    if "__metadata__" in ordered:
        ordered["__metadata__"] = dict(sorted(ordered["__metadata__"].items()))
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + length :]
