"""What is read back from storage is checked, and nothing a user stored is lost to a race or a
poisoned object: NaN manifests, forged names, gc racing a re-publish, digest references."""

from __future__ import annotations

import json
import os
import time

import pytest
from helpers import publish_lora, snapshot, write_lora
from safetensors.torch import load_file, save_file

from lorafleet.registry import PublishRequest
from lorafleet.registry.adapter_registry import blob_key, manifest_key
from lorafleet.registry.errors import IntegrityError, InvalidAdapter, InvalidName, InvalidReference, VersionNotFound
from lorafleet.synthetic import synthetic_lora


def _lora_with_alpha(directory, spec, alpha: str):
    """A diffusers-layout LoRA whose adapter metadata says lora_alpha = ``alpha`` (a JSON literal)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "lora.safetensors"
    payload = synthetic_lora(spec)
    config = json.dumps({"unet.r": 4, "unet.target_modules": ["to_q"], "unet.lora_alpha": 1234.5})
    metadata = {"format": "pt", "lora_adapter_metadata": config.replace("1234.5", alpha)}
    save_file(payload.tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("alpha", ["NaN", "Infinity", "-Infinity"])
def test_a_non_finite_alpha_is_refused_and_nothing_is_stored(registry, tiny_spec, tmp_path, alpha):
    publish_lora(registry, tiny_spec, tmp_path, name="existing")
    before = snapshot(registry)
    path = _lora_with_alpha(tmp_path / "bad", tiny_spec, alpha)
    with pytest.raises(InvalidAdapter, match="finite"):
        registry.publish(path, PublishRequest(name="nan", base=tiny_spec))
    assert snapshot(registry) == before
    assert [m.name for m in registry.list()] == ["existing"]


def test_non_finite_training_metrics_are_refused_before_anything_is_stored(registry, tiny_spec, tmp_path):
    path = write_lora(tmp_path, tiny_spec)
    with pytest.raises(InvalidAdapter) as caught:
        registry.publish(path, PublishRequest(name="m", base=tiny_spec, metrics={"loss": float("nan")}))
    assert "metrics" in str(caught.value)
    assert snapshot(registry) == {}


def _poison(registry, name: str, version: int, change) -> None:
    """Rewrite a stored manifest as someone with write access to the bucket could."""
    key = manifest_key(name, version)
    data = json.loads(registry.store.read(key).data)
    change(data)
    raw = json.dumps(data).replace("1234.5", "NaN").encode()
    registry.store.delete(key)
    registry.store.create(key, raw)


def test_one_unreadable_manifest_is_skipped_and_reported_not_fatal(registry, tiny_spec, tmp_path):
    publish_lora(registry, tiny_spec, tmp_path, name="good")
    publish_lora(registry, tiny_spec, tmp_path, name="poisoned", seed=1)
    _poison(registry, "poisoned", 1, lambda m: m.update(alpha=1234.5))
    listing = registry.listing()
    assert [m.name for m in listing.manifests] == ["good"]
    assert len(listing.skipped) == 1 and "poisoned@1" in listing.skipped[0]
    report = registry.gc(grace_seconds=0)  # an unreadable manifest may reference any blob
    assert report.removed == [] and report.unreadable
    assert registry.delete("poisoned@1", force=True) == []
    assert registry.listing().skipped == []
    assert [m.name for m in registry.list()] == ["good"]


def test_delete_needs_force_and_an_exact_version(registry, tiny_spec, tmp_path):
    publish_lora(registry, tiny_spec, tmp_path, name="keep", aliases=["prod"])
    before = snapshot(registry)
    for ref, force in [("keep@1", False), ("keep", True), ("keep:prod", True)]:
        with pytest.raises((InvalidReference, InvalidName)):
            registry.delete(ref, force=force)
    with pytest.raises(VersionNotFound):
        registry.delete("keep@2", force=True)
    assert snapshot(registry) == before
    assert registry.delete("keep@1", force=True) == ["prod"]


@pytest.mark.parametrize("forged", [
    {"name": "../../../../tmp/x"},
    {"name": "other"},
    {"version": 7},
    {"size": 1 << 50},
    {"digest": "sha256:../../x"},
])
def test_forged_manifests_are_refused_on_read(registry, tiny_spec, tmp_path, forged):
    publish_lora(registry, tiny_spec, tmp_path, name="victim")
    _poison(registry, "victim", 1, lambda m: m.update(forged))
    with pytest.raises(IntegrityError):
        registry.resolve("victim@1")
    with pytest.raises(IntegrityError):
        registry.pull("victim@1", tmp_path / "dest")
    assert not (tmp_path / "tmp").exists()
    assert list((tmp_path / "dest").glob("*")) == []


def test_the_cli_lists_around_a_poisoned_manifest_and_deletes_it(tmp_path, tiny_spec, capsys):
    from lorafleet.cli import main
    from lorafleet.registry import AdapterRegistry

    uri = f"file://{tmp_path / 'reg'}"
    registry = AdapterRegistry(uri)
    publish_lora(registry, tiny_spec, tmp_path, name="good")
    publish_lora(registry, tiny_spec, tmp_path, name="bad", seed=2)
    _poison(registry, "bad", 1, lambda m: m.update(alpha=1234.5))
    assert main(["registry", "list", "--registry", uri]) == 0
    out, err = capsys.readouterr()
    assert "good@1" in out and "bad@1" in err and "Traceback" not in err
    assert main(["registry", "delete", "--registry", uri, "bad@1"]) == 2  # --force is required
    assert main(["registry", "delete", "--registry", uri, "bad@1", "--force"]) == 0
    capsys.readouterr()
    assert main(["registry", "list", "--registry", uri]) == 0
    assert capsys.readouterr().err == ""


def test_republishing_existing_bytes_refreshes_the_blob(registry, tiny_spec, tmp_path):
    manifest = publish_lora(registry, tiny_spec, tmp_path)
    key = blob_key(manifest.digest)

    def modified() -> float:
        return registry.store.info(key).modified

    first = modified()
    deadline = time.time() + 5
    while time.time() < first + 1.1 and time.time() < deadline:  # S3 timestamps have 1 s resolution
        time.sleep(0.05)
    publish_lora(registry, tiny_spec, tmp_path, name="again")  # the same bytes: the blob exists
    assert modified() > first


class _PublishDuringGc:
    """A store that lets a publisher run between gc's reference scan and its deletes: the race."""

    def __init__(self, store, publish):
        self._store, self._publish, self._done = store, publish, False

    def __getattr__(self, name):
        return getattr(self._store, name)

    def list(self, prefix):
        items = list(self._store.list(prefix))
        if prefix == "blobs/sha256/" and not self._done:
            self._done = True
            self._publish()
        return iter(items)


def test_gc_does_not_delete_a_blob_that_a_publish_is_reusing(tmp_path, tiny_spec):
    """A crashed publish left a blob two hours ago; the same bytes are published again while gc runs."""
    from lorafleet.registry import AdapterRegistry

    registry = AdapterRegistry(f"file://{tmp_path / 'reg'}")
    source = write_lora(tmp_path / "src", tiny_spec)
    manifest = registry.publish(source, PublishRequest(name="crashed", base=tiny_spec))
    registry.store.delete(manifest_key("crashed", 1))  # as if the crash came before the manifest
    blob = registry.store.root / blob_key(manifest.digest)
    two_hours_ago = time.time() - 7200
    os.utime(blob, (two_hours_ago, two_hours_ago))
    racing = AdapterRegistry(store=_PublishDuringGc(
        registry.store, lambda: registry.publish(source, PublishRequest(name="retry", base=tiny_spec))))
    report = racing.gc(grace_seconds=3600)
    assert report.removed == []
    assert load_file(str(registry.pull("retry@1", tmp_path / "out")[1]))


def test_digest_references_resolve_through_the_index_not_a_scan(registry, tiny_spec, tmp_path):
    manifests = [publish_lora(registry, tiny_spec, tmp_path, name="many", seed=s) for s in range(4)]
    reads = []
    original = registry.store.read

    def counting_read(key):
        reads.append(key)
        return original(key)

    registry.store.read = counting_read
    target = manifests[1]
    assert registry.resolve(f"many@{target.digest}").version == 2
    assert [k for k in reads if k.startswith("manifests/")] == [manifest_key("many", 2)]
    with pytest.raises(VersionNotFound):
        registry.resolve("many@sha256:" + "0" * 64)
    assert len([k for k in reads if k.startswith("manifests/")]) == 1


def test_reindex_restores_digest_resolution_of_versions_written_without_an_index(registry, tiny_spec, tmp_path):
    manifest = publish_lora(registry, tiny_spec, tmp_path, name="old")
    for info in list(registry.store.list("index/")):
        registry.store.delete(info.key)
    with pytest.raises(VersionNotFound):
        registry.resolve(f"old@{manifest.digest}")
    assert registry.reindex() == 1
    assert registry.resolve(f"old@{manifest.digest}").version == 1
