"""POST /v1/datasets through the real HTTP server: archives as users make them, and bad ones.

Good: a zip made by `zip -r` of a folder (one top folder), a tar.gz, a multipart upload, a JSON
body naming a file:// URI under an allowed prefix; the same files give the same digest whatever
the archive. Bad: empty, corrupt, not an archive, no usable image, path traversal, over the limit
-> 4xx naming the field, and nothing stored.
"""

from __future__ import annotations

import io
import tarfile
import zipfile

import httpx
import pytest
from helpers import S3_BUCKET

from lorafleet.devtools.shapes import write_shapes_folder
from lorafleet.local_cluster import free_port
from lorafleet.serve.server import serving_in_thread
from lorafleet.serve.settings import load_settings

TOKEN_TRAIN, TOKEN_GENERATE = "t" * 40, "g" * 40


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes_folder(tmp_path_factory.mktemp("shapes") / "cyan", 4, colour="cyan", shape="circle")


@pytest.fixture(scope="module")
def server(tmp_path_factory, shapes):
    root = tmp_path_factory.mktemp("datasets-api")
    allowed = root / "uploads"
    allowed.mkdir()
    settings = load_settings(base="toy", registry=f"file://{root / 'registry'}", port=free_port(),
                             api_tokens=f"{TOKEN_TRAIN}=train,{TOKEN_GENERATE}=generate",
                             trainings={"ray_address": "http://127.0.0.1:9", "max_upload_bytes": 200_000,
                                        "dataset_uri_prefixes": [f"file://{allowed}/", f"s3://{S3_BUCKET}/uploads/"]})
    with serving_in_thread(settings) as url:
        yield url, root, allowed


def _client(url, token=TOKEN_TRAIN):
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)


def _zip(folder, top="cyan") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.iterdir()):
            archive.write(path, f"{top}/{path.name}")
        archive.writestr("__MACOSX/._a.png", b"junk")
    return buffer.getvalue()


def _tar_gz(folder) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path in sorted(folder.iterdir()):
            archive.add(path, path.name)
    return buffer.getvalue()


def test_archives_of_every_kind_store_the_same_dataset(server, shapes):
    url, _, allowed = server
    with _client(url) as client:
        by_zip = client.post("/v1/datasets", content=_zip(shapes), headers={"Content-Type": "application/zip"})
        assert by_zip.status_code == 201, by_zip.text
        report = by_zip.json()
        assert report["images"] == 4 and report["digest"].startswith("sha256:")
        assert report["caption_words"]["mean"] == 3 and report["ignored"] == []  # __MACOSX is not data
        by_tar = client.post("/v1/datasets", content=_tar_gz(shapes), headers={"Content-Type": "application/gzip"})
        multipart = client.post("/v1/datasets", files={"file": ("data.zip", _zip(shapes), "application/zip")})
        (allowed / "data.tar.gz").write_bytes(_tar_gz(shapes))
        by_uri = client.post("/v1/datasets", json={"uri": f"file://{allowed}/data.tar.gz"})
        for response in (by_tar, multipart, by_uri):
            assert response.status_code == 201, response.text
            assert response.json()["digest"] == report["digest"]
        assert by_uri.json()["source"] == f"file://{allowed}/data.tar.gz"
        shown = client.get(f"/v1/datasets/{report['digest']}")
        assert shown.status_code == 200 and shown.json()["images"] == 4


def test_a_dataset_named_by_an_s3_uri_is_read_from_the_s3_server(server, shapes, seaweed, tmp_path):
    from lorafleet.registry.storage import open_store

    url, _, _ = server
    archive = tmp_path / "cyan.tar.gz"
    archive.write_bytes(_tar_gz(shapes))
    open_store(f"s3://{S3_BUCKET}/uploads").put_blob("team-a/cyan.tar.gz", archive)
    with _client(url) as client:
        response = client.post("/v1/datasets", json={"uri": f"s3://{S3_BUCKET}/uploads/team-a/cyan.tar.gz"})
        missing = client.post("/v1/datasets", json={"uri": f"s3://{S3_BUCKET}/uploads/team-a/none.tar.gz"})
    assert response.status_code == 201, response.text
    assert response.json()["images"] == 4 and response.json()["source"].startswith("s3://")
    assert missing.status_code == 422 and missing.json()["error"]["field"] == "uri"


def test_a_dataset_reports_what_it_skipped_and_why(server, shapes):
    url, _, _ = server
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(shapes.iterdir()):
            archive.write(path, path.name)
        archive.writestr("broken.png", b"not a png")
        archive.writestr("notes.md", b"hello")
        archive.writestr("nested/deeper.png", (shapes / sorted(p.name for p in shapes.iterdir())[0]).read_bytes())
    with _client(url) as client:
        response = client.post("/v1/datasets", content=buffer.getvalue(), headers={"Content-Type": "application/zip"})
    assert response.status_code == 201, response.text
    report = response.json()
    assert report["images"] == 4 and report["skipped"] == {"unreadable": ["broken.png"]}
    assert report["source"] == "upload"
    assert sorted(report["ignored"]) == ["nested/deeper.png", "notes.md"]


BAD_UPLOADS = {
    "empty": (b"", "application/zip", 422, "file"),
    "not an archive": (b"hello, I am text" * 10, "application/zip", 422, "file"),
    "corrupt zip": (b"PK\x03\x04" + b"\x00" * 200, "application/zip", 422, "file"),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_bad_uploads_are_refused_with_the_field_named(server, case):
    url, root, _ = server
    body, kind, status, field = BAD_UPLOADS[case]
    stored_before = sorted((root / "registry").rglob("*"))
    with _client(url) as client:
        response = client.post("/v1/datasets", content=body, headers={"Content-Type": kind})
    assert response.status_code == status, response.text
    assert response.json()["error"]["field"] == field
    assert sorted((root / "registry").rglob("*")) == stored_before


def test_an_archive_without_a_usable_image_is_422_with_the_reasons(server):
    url, _, _ = server
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.png", b"not an image")
        archive.writestr("../../escape.png", b"x")
        archive.writestr("a.txt", b"a caption")
    with _client(url) as client:
        response = client.post("/v1/datasets", content=buffer.getvalue(), headers={"Content-Type": "application/zip"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == "file" and "no usable image" in error["message"] and "1 unreadable" in error["message"]


def test_uploads_over_the_limit_are_413_streamed_or_declared(server):
    url, _, _ = server
    big = b"\0" * 300_000
    with _client(url) as client:
        declared = client.post("/v1/datasets", content=big, headers={"Content-Type": "application/zip"})

        def chunks():
            for _ in range(30):
                yield b"\0" * 10_000

        streamed = client.post("/v1/datasets", content=chunks(), headers={"Content-Type": "application/zip"})
    assert declared.status_code == 413 and streamed.status_code == 413
    assert streamed.json()["error"]["field"] in ("file", "body")


def test_uris_outside_the_allowed_prefixes_and_bad_json_are_refused(server, tmp_path):
    url, _, _ = server
    (tmp_path / "x.tar").write_bytes(b"whatever")
    with _client(url) as client:
        outside = client.post("/v1/datasets", json={"uri": f"file://{tmp_path}/x.tar"})
        bad = client.post("/v1/datasets", json={"url": "s3://b/k"})
        missing = client.get("/v1/datasets/sha256:" + "0" * 64)
    assert outside.status_code == 422 and outside.json()["error"]["field"] == "uri"
    assert bad.status_code == 422 and bad.json()["error"]["field"] in ("uri", "url")
    assert missing.status_code == 404


def test_dataset_and_training_routes_need_the_train_scope(server, shapes):
    url, _, _ = server
    with _client(url, TOKEN_GENERATE) as client:
        assert client.post("/v1/datasets", content=_zip(shapes),
                           headers={"Content-Type": "application/zip"}).status_code == 403
        assert client.get("/v1/trainings").status_code == 403
    with httpx.Client(base_url=url) as anonymous:
        assert anonymous.get("/v1/trainings").status_code == 401
