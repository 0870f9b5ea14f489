"""The registry contract, run against every storage backend (local directory and real S3)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import publish_lora, snapshot
from safetensors.torch import load_file

from lorafleet.registry import AdapterRegistry
from lorafleet.registry.adapter_registry import blob_key
from lorafleet.registry.errors import (
    AdapterNotFound,
    AliasConflict,
    AliasNotFound,
    IntegrityError,
    InvalidName,
    VersionNotFound,
    YankedVersion,
)


def test_versions_are_assigned_in_order_and_every_reference_resolves(registry, tiny_spec, tmp_path):
    first = publish_lora(registry, tiny_spec, tmp_path, seed=0)
    second = publish_lora(registry, tiny_spec, tmp_path, seed=1)
    assert (first.version, second.version) == (1, 2)
    assert first.digest != second.digest
    assert registry.resolve("style").version == 2
    assert registry.resolve("style:latest").version == 2
    assert registry.resolve("style@1").digest == first.digest
    assert registry.resolve(f"style@{first.digest}").version == 1
    assert [m.version for m in registry.list("style")] == [1, 2]
    assert [(m.name, m.version) for m in registry.list()] == [("style", 2)]
    assert registry.names() == ["style"]


def test_manifest_records_identity_base_and_lora_config(registry, tiny_spec, tmp_path):
    manifest = publish_lora(registry, tiny_spec, tmp_path, description="watercolour look")
    assert manifest.base.id == "tiny" and manifest.base.fingerprint == tiny_spec.fingerprint
    assert manifest.rank == 4 and manifest.alpha == 4.0
    assert manifest.components["unet"].target_modules
    assert all(t.startswith("unet.") for t in manifest.target_modules)
    assert manifest.description == "watercolour look"
    assert manifest.size == len(registry.read_blob(manifest))
    assert manifest.digest == "sha256:" + hashlib.sha256(registry.read_blob(manifest)).hexdigest()


def test_identical_bytes_share_one_blob_and_one_digest(registry, tiny_spec, tmp_path):
    a = publish_lora(registry, tiny_spec, tmp_path, name="one", seed=7)
    b = publish_lora(registry, tiny_spec, tmp_path, name="two", seed=7)
    assert a.digest == b.digest
    blobs = [i.key for i in registry.store.list("blobs/")]
    assert blobs == [blob_key(a.digest)]


def test_unknown_adapters_and_versions_are_not_found(registry, tiny_spec, tmp_path):
    with pytest.raises(AdapterNotFound):
        registry.resolve("missing")
    publish_lora(registry, tiny_spec, tmp_path)
    with pytest.raises(VersionNotFound):
        registry.resolve("style@9")
    with pytest.raises(VersionNotFound):
        registry.resolve("style@sha256:" + "0" * 64)
    with pytest.raises(AliasNotFound):
        registry.resolve("style:prod")


def test_aliases_move_by_compare_and_swap_and_keep_history(registry, tiny_spec, tmp_path):
    publish_lora(registry, tiny_spec, tmp_path, seed=0, aliases=["prod"])
    publish_lora(registry, tiny_spec, tmp_path, seed=1)
    assert registry.resolve("style:prod").version == 1
    record = registry.set_alias("style", "prod", 2, expected_version=1)
    assert record.version == 2 and record.revision == 2
    assert [move.version for move in record.history] == [1, 2]
    assert registry.resolve("style:prod").version == 2
    with pytest.raises(AliasConflict):
        registry.set_alias("style", "prod", 1, expected_version=1)  # someone else moved it
    assert registry.resolve("style:prod").version == 2
    registry.set_alias("style", "prod", 1)  # roll back
    assert registry.resolve("style:prod").version == 1
    assert registry.aliases("style") == {"prod": 1}
    with pytest.raises(VersionNotFound):
        registry.set_alias("style", "prod", 5)
    with pytest.raises(InvalidName):
        registry.set_alias("style", "latest", 1)


def test_yanked_version_resolves_only_by_exact_version(registry, tiny_spec, tmp_path):
    publish_lora(registry, tiny_spec, tmp_path, seed=0)
    second = publish_lora(registry, tiny_spec, tmp_path, seed=1, aliases=["prod"])
    yanked = registry.yank("style@2", reason="washed-out colours")
    assert yanked.yanked and yanked.yanked_reason == "washed-out colours"
    assert registry.resolve("style").version == 1
    assert registry.resolve("style@2").yanked
    assert registry.resolve(f"style@{second.digest}").version == 2
    with pytest.raises(YankedVersion):
        registry.resolve("style:prod")
    with pytest.raises(YankedVersion):
        registry.set_alias("style", "canary", 2)
    registry.yank("style@2")  # idempotent
    registry.yank("style@1")
    with pytest.raises(YankedVersion):
        registry.resolve("style")
    assert registry.list() == []
    assert [m.yanked for m in registry.list("style")] == [True, True]


def test_pull_writes_a_verified_safetensors_file_and_manifest(registry, tiny_spec, tmp_path):
    manifest = publish_lora(registry, tiny_spec, tmp_path)
    pulled_manifest, path = registry.pull("style", tmp_path / "pulled")
    assert pulled_manifest == manifest
    assert "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() == manifest.digest
    assert all(k.startswith("unet.") and ".lora_" in k for k in load_file(str(path)))
    saved = json.loads((tmp_path / "pulled" / "style-v1.manifest.json").read_text())
    assert saved["digest"] == manifest.digest


def _corrupt(registry: AdapterRegistry, digest: str, seaweed_client=None) -> None:
    key = blob_key(digest)
    stream = registry.store.open_blob(key)
    data = bytearray(stream.read())
    stream.close()
    data[-1] ^= 0xFF
    if registry.uri.startswith("file://"):
        Path(registry.uri[len("file://"):], key).write_bytes(bytes(data))
    else:
        bucket, prefix = registry.store.bucket, registry.store.prefix
        seaweed_client.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=bytes(data))


def test_corrupted_blob_is_never_handed_out(registry, tiny_spec, tmp_path, request):
    manifest = publish_lora(registry, tiny_spec, tmp_path)
    client = request.getfixturevalue("seaweed").client() if registry.uri.startswith("s3://") else None
    _corrupt(registry, manifest.digest, client)
    with pytest.raises(IntegrityError):
        registry.read_blob(manifest)
    with pytest.raises(IntegrityError):
        registry.pull("style", tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_gc_removes_only_old_unreferenced_blobs(registry, tiny_spec, tmp_path):
    manifest = publish_lora(registry, tiny_spec, tmp_path)
    orphan = tmp_path / "orphan.bin"
    orphan.write_bytes(b"not referenced by any manifest")
    orphan_digest = "sha256:" + hashlib.sha256(orphan.read_bytes()).hexdigest()
    registry.store.put_blob(blob_key(orphan_digest), orphan)
    recent = registry.gc(grace_seconds=3600)
    assert recent.removed == [] and recent.kept_recent == 1
    dry = registry.gc(grace_seconds=0, dry_run=True)
    assert dry.removed == [orphan_digest] and registry.store.exists(blob_key(orphan_digest))
    report = registry.gc(grace_seconds=0)
    assert report.removed == [orphan_digest] and report.referenced == 1
    assert not registry.store.exists(blob_key(orphan_digest))
    assert registry.read_blob(manifest)


_PUBLISHER = textwrap.dedent(
    """
    import sys, time, pathlib
    from lorafleet.bases import base_spec
    from lorafleet.registry import AdapterRegistry, PublishRequest
    uri, src, ready_dir, index, total = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    spec = base_spec("tiny")
    registry = AdapterRegistry(uri)
    (ready_dir / index).touch()
    deadline = time.monotonic() + 120
    while len(list(ready_dir.iterdir())) < total and time.monotonic() < deadline:
        time.sleep(0.01)
    manifest = registry.publish(pathlib.Path(src), PublishRequest(name="race", base=spec))
    print(manifest.version, manifest.digest)
    """
)


@pytest.mark.slow
def test_eight_concurrent_publishers_get_distinct_versions(registry, tiny_spec, tmp_path):
    from helpers import write_lora

    ready = tmp_path / "ready"
    ready.mkdir()
    processes = []
    for index in range(8):
        source = write_lora(tmp_path / f"src{index}", tiny_spec, seed=100 + index)
        processes.append(subprocess.Popen(
            [sys.executable, "-c", _PUBLISHER, registry.uri, str(source), str(ready), str(index), "8"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    results = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-2000:]
        version, digest = out.split()[-2:]
        results.append((int(version), digest))
    assert sorted(v for v, _ in results) == list(range(1, 9))
    assert len({d for _, d in results}) == 8
    manifests = registry.list("race")
    assert [m.version for m in manifests] == list(range(1, 9))
    assert {(m.version, m.digest) for m in manifests} == set(results)
    for manifest in manifests:
        registry.read_blob(manifest)  # verifies the digest
    assert len(snapshot(registry)) == 24  # 8 manifests + 8 blobs + 8 digest-index entries, nothing else
