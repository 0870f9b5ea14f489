"""Canary splits: an alias over several versions with weights, stored with compare-and-swap and
history, sticky per caller key, the version served named in each response, per-version metrics;
moving the alias to one version ends the split."""

from __future__ import annotations

import collections
import json
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient
from helpers import metric_samples, publish_lora
from serve_setup import PROMPT

from lorafleet.registry import AdapterRegistry
from lorafleet.registry.errors import InvalidAdapter, YankedVersion
from lorafleet.serve.app import create_local_app
from lorafleet.serve.settings import ServeSettings

ADMIN = "admin-token-0123456789abcdef0123456789"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_spec):
    root = tmp_path_factory.mktemp("canary")
    registry = AdapterRegistry(f"file://{root / 'registry'}")
    for seed in range(3):
        publish_lora(registry, tiny_spec, root, name="watercolor", seed=seed, aliases=["prod"])
    settings = ServeSettings(base="tiny", registry=registry.uri, api_tokens=f"{ADMIN}=admin", resolution_ttl_s=0,
                             cache={"disk_dir": str(root / "cache")})
    app, service = create_local_app(settings, registry)
    with TestClient(app) as client:
        yield registry, client, service


def _as_admin() -> dict:
    return {"Authorization": f"Bearer {ADMIN}"}


def test_a_split_serves_each_version_its_share_of_1000_sticky_keys(setup, record):
    registry, client, service = setup
    moved = client.put("/v1/adapters/watercolor/aliases/prod", json={"weights": {"1": 0.9, "2": 0.1}},
                       headers=_as_admin())
    assert moved.status_code == 200, moved.text
    assert moved.json()["split"] == {"1": 0.9, "2": 0.1} and moved.json()["version"] == 1
    counts = collections.Counter(service.resolver.resolve("watercolor:prod", "adapter", key=f"-\0user-{i}").version
                                 for i in range(1000))
    share = counts[2] / 1000
    record("canary split over 1,000 sticky keys", {"weights": "1=0.9,2=0.1"}, {"share_of_v2": share})
    assert abs(share - 0.1) <= 0.03, counts
    for user in ("alice", "bob", "carol"):  # sticky: the same user, the same version, every time
        versions = {client.post("/v1/generate", json={"prompt": PROMPT, "adapter": "watercolor:prod", "steps": 1,
                                                      "seed": n, "user": user}, headers=_as_admin()
                                ).json()["adapters"][0]["version"] for n in range(4)}
        assert len(versions) == 1
    by_header = client.post("/v1/generate", json={"prompt": PROMPT, "adapter": "watercolor:prod", "steps": 1},
                            headers={**_as_admin(), "X-Lorafleet-User": "alice"})
    assert by_header.json()["adapters"][0]["version"] in (1, 2)
    samples = metric_samples(client.get("/metrics", headers=_as_admin()).text)
    served = {labels: value for (name, labels), value in samples.items()
              if name == "lorafleet_adapter_version_requests_total"}
    assert sum(served.values()) >= 13 and all(dict(labels)["outcome"] == "ok" for labels in served)


def test_moving_to_one_version_ends_the_split_and_history_keeps_both(setup):
    registry, client, _ = setup
    client.put("/v1/adapters/watercolor/aliases/prod", json={"weights": {"1": 0.5, "3": 0.5}}, headers=_as_admin())
    ended = client.put("/v1/adapters/watercolor/aliases/prod", json={"version": 3}, headers=_as_admin())
    assert ended.status_code == 200 and ended.json()["split"] is None
    record = registry.alias_record("watercolor", "prod")
    assert record.split is None and record.version == 3
    assert record.history[-2].split == {1: 0.5, 3: 0.5} and record.history[-1].split is None
    assert {registry.resolve("watercolor:prod", key=f"k{i}").version for i in range(50)} == {3}


def test_bad_splits_are_refused_and_change_nothing(setup):
    registry, client, _ = setup
    before = registry.alias_record("watercolor", "prod")
    for body in ({"weights": {"1": 0.5, "2": 0.4}}, {"weights": {"1": 0.5, "99": 0.5}}, {"weights": {}},
                 {"weights": {"1": 1.0}, "version": 1}):
        response = client.put("/v1/adapters/watercolor/aliases/prod", json=body, headers=_as_admin())
        assert response.status_code in (404, 422), (body, response.text)
    conflict = client.put("/v1/adapters/watercolor/aliases/prod",
                          json={"weights": {"1": 0.5, "2": 0.5}, "expected_version": 2}, headers=_as_admin())
    assert conflict.status_code == 409
    assert registry.alias_record("watercolor", "prod") == before
    with pytest.raises(InvalidAdapter):
        registry.split_alias("watercolor", "prod", {1: 0.7, 2: 0.7})


def test_a_split_onto_a_yanked_version_is_refused(setup, tiny_spec, tmp_path):
    registry, _, _ = setup
    publish_lora(registry, tiny_spec, tmp_path, name="watercolor", seed=9)
    registry.yank("watercolor@4", "bad")
    with pytest.raises(YankedVersion):
        registry.split_alias("watercolor", "canary", {3: 0.5, 4: 0.5})


def test_the_cli_splits_and_ends_a_split(setup):
    registry, _, _ = setup
    cli = [sys.executable, "-m", "lorafleet.cli", "registry", "alias", "watercolor", "staging", "--registry",
           registry.uri]
    split = subprocess.run(cli[:7] + ["1=0.8,2=0.2"] + cli[7:] + ["--json"], capture_output=True, text=True,
                           timeout=60)
    assert split.returncode == 0, split.stderr
    assert json.loads(split.stdout)["split"] == {"1": 0.8, "2": 0.2}
    bad = subprocess.run(cli[:7] + ["1=0.8,2=zero"] + cli[7:], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "VERSION=WEIGHT" in bad.stderr and "Traceback" not in bad.stderr
    one = subprocess.run(cli[:7] + ["2"] + cli[7:], capture_output=True, text=True, timeout=60)
    assert one.returncode == 0 and "watercolor@2" in one.stdout
    assert registry.alias_record("watercolor", "staging").split is None
