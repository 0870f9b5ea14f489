"""Settings precedence, the Serve config for `serve deploy`, and `lorafleet serve` as a process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from lorafleet.serve.cli import serve_config
from lorafleet.serve.settings import ServeSettings, load_settings


def test_settings_precedence_file_then_env_then_flags(tmp_path, monkeypatch):
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"port": 9001, "replicas": 3, "cache": {"host_bytes": 1000},
                                      "limits": {"max_steps": 10, "default_steps": 5}}))
    monkeypatch.setenv("LORAFLEET_REPLICAS", "2")
    monkeypatch.setenv("LORAFLEET_CACHE__ACTIVE_MAX_ADAPTERS", "5")
    settings = load_settings(config, port=9002)
    assert settings.port == 9002  # flag beats file
    assert settings.replicas == 2  # env beats file
    assert settings.cache.host_bytes == 1000 and settings.cache.active_max_adapters == 5
    assert settings.limits.max_steps == 10


@pytest.mark.parametrize("bad", [{"port": 70000}, {"device": "tpu"}, {"unknown_key": 1}, {"dtype": "float8"},
                                 {"cache": {"active_max_adapters": 0}}, {"ingress": "nginx"}])
def test_bad_settings_are_refused_naming_the_key(tmp_path, bad):
    from lorafleet.serve.errors import RequestInvalid

    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(bad))
    with pytest.raises(RequestInvalid) as caught:
        load_settings(config)
    assert caught.value.field.split(".")[0] == next(iter(bad))


def test_each_ingress_spells_out_every_ray_switch_and_a_local_cluster_gets_its_own_haproxy_ports():
    from lorafleet.serve.ingress import HAPROXY_METRICS_PORT, HAPROXY_STATS_PORT, Ingress, ray_serve_environment
    from lorafleet.serve.server import local_ray_serve_environment

    fast, classic = (ray_serve_environment(ingress, 2.5) for ingress in (Ingress.haproxy, Ingress.ray_proxy))
    assert fast.keys() == classic.keys()  # a process that started one cluster can start the other
    assert fast["RAY_SERVE_ENABLE_HA_PROXY"] == fast["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert classic["RAY_SERVE_ENABLE_HA_PROXY"] == classic["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"
    assert fast["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "2.5"
    local = local_ray_serve_environment(ServeSettings(ingress="ray-proxy", ingress_drain_s=1))
    assert local.items() >= ray_serve_environment(Ingress.ray_proxy, 1).items()
    assert local[HAPROXY_METRICS_PORT] != local[HAPROXY_STATS_PORT]


def test_auth_without_tokens_refuses_to_start(tmp_path):
    from lorafleet.serve.auth import TokenTable
    from lorafleet.serve.errors import ServiceUnavailable

    with pytest.raises(ServiceUnavailable, match="no tokens"):
        TokenTable.from_settings(ServeSettings(auth_enabled=True))


def test_serve_config_never_contains_tokens():
    settings = ServeSettings(auth_enabled=True, api_tokens="secret-token-0123456789abcdef01234567=admin")
    assert "secret-token-0123456789abcdef01234567" not in yaml.safe_dump(serve_config(settings))


def test_serve_config_is_a_valid_serve_deploy_schema():
    from ray.serve.schema import ServeDeploySchema

    settings = ServeSettings(replicas=2, autoscaling={"min_replicas": 1, "max_replicas": 3})
    schema = ServeDeploySchema.model_validate(serve_config(settings)) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(serve_config(settings))
    app = schema.applications[0]
    assert app.import_path == "lorafleet.serve.app:app_builder"
    assert {d.name for d in app.deployments} == {"Gateway", "Generator"}


def test_app_builder_accepts_the_config_args():
    from lorafleet.serve.app import app_builder

    args = serve_config(ServeSettings(replicas=2))["applications"][0]["args"]
    assert app_builder(args) is not None


@pytest.mark.slow
def test_lorafleet_serve_starts_answers_and_stops_cleanly(tmp_path):
    """Through Ray's Python proxy (the other ingress; the Ray app tests run behind HAProxy)."""
    from lorafleet.local_cluster import free_port

    port = free_port()
    env = {**os.environ, "LORAFLEET_CACHE__DISK_DIR": str(tmp_path / "cache"),  # Ray token auth: the default
           "LORAFLEET_INGRESS": "ray-proxy"}
    process = subprocess.Popen([sys.executable, "-m", "lorafleet.cli", "serve", "--registry", f"file://{tmp_path}",
                                "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                               text=True, start_new_session=True)
    try:
        deadline, ready = time.monotonic() + 120, False
        while time.monotonic() < deadline and process.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                pass
            if ready:
                break
            time.sleep(0.5)
        assert ready, process.stdout.read() if process.poll() is not None else "not ready"
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).json()["ingress"] == "ray-proxy"
        while "serving" not in process.stdout.readline():  # handlers are installed before this line
            assert process.poll() is None
        response = httpx.post(f"http://127.0.0.1:{port}/v1/generate", json={"prompt": "a red circle", "steps": 2},
                              timeout=60)
        assert response.status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
