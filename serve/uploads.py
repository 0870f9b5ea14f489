"""Streamed uploads: a request body to a temporary file within a byte limit, multipart or raw.

The body is never held in memory: it is counted and written as it arrives (413 past the limit),
then a multipart/form-data body's file part is streamed out of it with python-multipart.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from python_multipart.multipart import MultipartParser, parse_options_header

from lorafleet.training.errors import DatasetInvalid, DatasetTooLarge

FILE_FIELD = "file"
_CHUNK = 1024 * 1024


async def body_to_file(chunks: AsyncIterator[bytes], limit: int, folder: Path) -> Path:
    """The raw body in a file under ``folder`` (DatasetTooLarge past ``limit`` bytes)."""
    path = folder / "body"
    size = 0
    with path.open("wb") as out:
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise DatasetTooLarge(f"the upload is over {limit} bytes (trainings.max_upload_bytes)", field="file")
            out.write(chunk)
    if size == 0:
        raise DatasetInvalid("the upload is empty", field="file")
    return path


def multipart_file(body: Path, content_type: str, folder: Path) -> Path:
    """The ``file`` part of a multipart/form-data body, as its own file."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise DatasetInvalid("multipart/form-data without a boundary", field="file")
    extractor = _FilePart(folder / "file")
    parser = MultipartParser(boundary, extractor.callbacks())
    try:
        with body.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                parser.write(chunk)
        parser.finalize()
    except Exception as exc:  # python-multipart raises its own errors for malformed bodies
        raise DatasetInvalid(f"the multipart body cannot be read: {exc}", field="file") from exc
    finally:
        extractor.close()
    if not extractor.found:
        raise DatasetInvalid(f"the multipart body has no '{FILE_FIELD}' part", field="file")
    return extractor.path


class _FilePart:
    """Callbacks that write the part named ``file`` to ``path``."""

    def __init__(self, path: Path):
        self.path, self.found = path, False
        self.out = None
        self.header_field, self.header_value = b"", b""
        self.headers: dict[bytes, bytes] = {}

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_header_field": self._field, "on_header_value": self._value,
                "on_header_end": self._header_end, "on_headers_finished": self._headers_done,
                "on_part_data": self._data, "on_part_end": self._end}

    def _begin(self) -> None:
        self.headers, self.header_field, self.header_value = {}, b"", b""

    def _field(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]

    def _value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def _header_end(self) -> None:
        self.headers[self.header_field.lower()] = self.header_value
        self.header_field, self.header_value = b"", b""

    def _headers_done(self) -> None:
        _, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        if options.get(b"name") == FILE_FIELD.encode() and not self.found:
            self.found = True
            self.out = self.path.open("wb")

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self.out is not None:
            self.out.write(data[start:end])

    def _end(self) -> None:
        self.close()

    def close(self) -> None:
        if self.out is not None:
            self.out.close()
            self.out = None


def upload_workdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="lorafleet-upload-")
