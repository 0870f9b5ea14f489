"""Where callers may point the server: webhooks and MLflow servers reach public addresses only,
unless the operator allows a host or a network (training/service/outbound.py).

The address rules are checked over a resolver table (what a name resolves to is the input);
submission goes through the real HTTP server, and a delivery refused after submission (a name
that now resolves inside) is checked against a real receiver on loopback that must hear nothing.
"""

from __future__ import annotations

import httpx
import pytest
from helpers import WebhookReceiver
from pydantic import ValidationError

from lorafleet.local_cluster import free_port
from lorafleet.serve.server import serving_in_thread
from lorafleet.serve.settings import load_settings
from lorafleet.training.errors import OutboundTargetRefused
from lorafleet.training.service.outbound import OutboundTargets
from lorafleet.training.service.records import Delivery
from lorafleet.training.service.webhooks import RetryPolicy, WebhookSender

DNS = {"hooks.example.com": ["93.184.215.14"], "metadata.lan": ["169.254.169.254"],
       "split.example.com": ["93.184.215.14", "10.1.2.3"], "v6.example.com": ["2606:4700::6810:85e5"],
       "mapped.example.com": ["::ffff:10.0.0.1"], "hooks.internal": ["10.20.3.4"]}


def _resolver(host: str, port: int) -> list[str]:
    return [host] if host[0].isdigit() or ":" in host else DNS.get(host, [])


@pytest.mark.parametrize("url", ["https://hooks.example.com/lorafleet", "http://93.184.215.14:8080/x",
                                 "https://v6.example.com/"])
def test_public_targets_are_allowed(url):
    assert OutboundTargets().refusal(url, _resolver) is None


@pytest.mark.parametrize("url, named", [
    ("http://127.0.0.1:8265/api/jobs/", "127.0.0.1"),  # Ray's job server on the same pod
    ("http://metadata.lan/latest/meta-data/", "169.254.169.254"),  # a cloud metadata endpoint
    ("http://10.0.0.7:5432/", "10.0.0.7"),
    ("http://[::1]:8000/", "::1"),
    ("https://split.example.com/", "10.1.2.3"),  # one private address among public ones is enough
    ("https://mapped.example.com/", "::ffff:a00:1"),
    ("http://0.0.0.0/", "0.0.0.0"),
])
def test_private_loopback_and_link_local_targets_are_refused(url, named):
    reason = OutboundTargets().refusal(url, _resolver)
    assert reason is not None and named in reason and "webhooks.allowed_hosts" in reason


def test_names_that_do_not_resolve_and_other_schemes_are_refused():
    assert "does not resolve" in OutboundTargets().refusal("https://nowhere.example.com/", _resolver)
    assert "http(s)" in OutboundTargets().refusal("file:///var/lib/mlruns", _resolver)
    assert "http(s)" in OutboundTargets().refusal("sqlite:///mlflow.db", _resolver)


def test_an_operator_allows_a_host_a_network_or_everything():
    assert OutboundTargets(allowed_hosts=["hooks.internal"]).refusal("http://hooks.internal/x", _resolver) is None
    assert OutboundTargets(allowed_hosts=["HOOKS.internal"]).refusal("http://hooks.internal/x", _resolver) is None
    assert OutboundTargets(allowed_hosts=["10.20.0.0/16"]).refusal("http://hooks.internal/x", _resolver) is None
    assert OutboundTargets(allowed_hosts=["10.30.0.0/16"]).refusal("http://hooks.internal/x", _resolver)
    assert OutboundTargets(allow_private=True).refusal("http://127.0.0.1:9/", _resolver) is None


@pytest.mark.parametrize("hosts", [["10.0.0.0/33"], ["user@host"], [""], ["host:80"]])
def test_bad_allowed_hosts_are_refused_in_the_settings(hosts):
    with pytest.raises(ValidationError, match="allowed_hosts"):
        OutboundTargets(allowed_hosts=hosts)


def test_check_raises_naming_the_field():
    with pytest.raises(OutboundTargetRefused) as raised:
        OutboundTargets().check("http://127.0.0.1/", "webhook.url", _resolver)
    assert raised.value.field == "webhook.url"


def test_a_delivery_to_a_target_refused_since_submission_is_not_made_and_is_recorded():
    receiver = WebhookReceiver()
    recorded: list[tuple[str, Delivery]] = []
    sender = WebhookSender(RetryPolicy(attempts=3, first_delay_s=0), lambda tid, d: recorded.append((tid, d)),
                           OutboundTargets())
    sender._deliver("tr-1", receiver.url, "s" * 16, "training.succeeded", {"state": "succeeded"})
    assert receiver.received == []
    assert len(recorded) == 1 and not recorded[0][1].delivered and recorded[0][1].error.startswith("refused: ")
    sender.close()
    allowed = WebhookSender(RetryPolicy(attempts=1), lambda tid, d: recorded.append((tid, d)),
                            OutboundTargets(allowed_hosts=["127.0.0.1/32"]))
    allowed._deliver("tr-2", receiver.url, "s" * 16, "training.succeeded", {"state": "succeeded"})
    assert len(receiver.received) == 1 and recorded[-1][1].delivered
    allowed.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("outbound")
    settings = load_settings(base="toy", registry=f"file://{root / 'registry'}", port=free_port(),
                             trainings={"ray_address": "http://127.0.0.1:9"})
    with serving_in_thread(settings) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


TRAINING = {"config": {"method": "lora", "base": "toy", "max_steps": 5}, "dataset": "sha256:" + "0" * 64,
            "publish": {"name": "outbound-style"}}


@pytest.mark.parametrize("extra, field", [
    ({"webhook": {"url": "http://127.0.0.1:8265/api/jobs/", "secret": "s" * 16}}, "webhook.url"),
    ({"webhook": {"url": "http://169.254.169.254/latest/", "secret": "s" * 16}}, "webhook.url"),
    ({"config": {**TRAINING["config"], "tracking": {"mlflow_uri": "http://127.0.0.1:5000"}}},
     "config.tracking.mlflow_uri"),
    ({"config": {**TRAINING["config"], "tracking": {"mlflow_uri": "file:///etc/lorafleet"}}},
     "config.tracking.mlflow_uri"),
])
def test_trainings_with_an_internal_webhook_or_mlflow_server_are_422_and_not_stored(server, extra, field):
    refused = server.post("/v1/trainings", json={**TRAINING, **extra})
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["field"] == field and refused.json()["error"]["code"] == "outbound_target_refused"
    assert server.get("/v1/trainings").json() == []


def test_async_generation_with_an_internal_webhook_is_422_and_no_job_starts(server):
    refused = server.post("/v1/generate", json={"prompt": "a red circle", "steps": 1, "async": True,
                                                 "webhook": {"url": "http://10.0.0.7/hook", "secret": "s" * 16}})
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["field"] == "webhook.url"
