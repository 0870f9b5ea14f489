"""User feedback through the HTTP API: every response carries a request id; ratings (stars or
thumbs) are stored per adapter version in a real database through SQLAlchemy (SQLite, and a
PostgreSQL server started here), update on a second rating, survive a restart, stay within their
tenant, and show in /v1/adapters/{name} and in Prometheus; gateways rating at once never fail."""

from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient
from helpers import metric_samples, publish_lora
from serve_setup import PROMPT

from lorafleet.registry import AdapterRegistry
from lorafleet.serve.app import create_local_app
from lorafleet.serve.settings import ServeSettings

ACME, GLOBEX = "acme-token-0123456789abcdef0123456789", "globex-token-0123456789abcdef012345678"
OPERATOR = "operator-admin-0123456789abcdef012345"


@pytest.fixture(scope="module")
def postgres():
    from lorafleet.devtools.postgres import start_postgres

    with start_postgres() as server:
        yield server


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def database_url(request, tmp_path_factory):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'feedback.db'}"
    return request.getfixturevalue("postgres").url


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_spec, database_url):
    root = tmp_path_factory.mktemp("feedback")
    registry = AdapterRegistry(f"file://{root / 'registry'}")
    for seed in range(2):
        publish_lora(registry, tiny_spec, root, name="acme-look", seed=seed, aliases=["prod"])

    def app():
        settings = ServeSettings(
            base="tiny", registry=registry.uri, cache={"disk_dir": str(root / "cache")},
            api_tokens=f"{ACME}=generate@acme,{GLOBEX}=generate@globex,{OPERATOR}=admin",
            tenants={"acme": {"namespaces": ["acme-"]}, "globex": {"namespaces": ["globex-"]}},
            feedback={"database_url": database_url})
        return create_local_app(settings, registry)[0]

    return app


def _as(token):
    return {"Authorization": f"Bearer {token}"}


def _generate(client, adapter, seed):
    response = client.post("/v1/generate", json={"prompt": PROMPT, "adapter": adapter, "steps": 1, "seed": seed},
                           headers=_as(ACME))
    assert response.status_code == 200, response.text
    assert response.headers["X-Request-Id"] == response.json()["request_id"]
    return response.json()["request_id"]


def test_ratings_are_stored_per_version_updated_and_kept_across_a_restart(setup):
    with TestClient(setup()) as client:
        first = _generate(client, "acme-look@1", 1)
        rated = client.post("/v1/feedback", json={"request_id": first, "rating": 2}, headers=_as(ACME))
        assert rated.status_code == 200, rated.text
        assert rated.json() == {"request_id": first, "adapters": ["acme-look@1"], "updated": False}
        again = client.post("/v1/feedback", json={"request_id": first, "rating": 5, "tags": ["sharp"],
                                                  "comment": "better than I thought"}, headers=_as(ACME))
        assert again.json()["updated"] is True
        for seed, thumb in ((2, "up"), (3, "down"), (4, "up")):
            request_id = _generate(client, "acme-look@2", seed)
            assert client.post("/v1/feedback", json={"request_id": request_id, "thumb": thumb},
                               headers=_as(ACME)).status_code == 200
        unrated = _generate(client, "acme-look@2", 9)
        samples = metric_samples(client.get("/metrics", headers=_as(OPERATOR)).text)
        assert samples[("lorafleet_feedback_total", (("adapter", "acme-look"), ("kind", "up"), ("version", "2")))] == 2

    with TestClient(setup()) as client:  # a restarted server: the same database
        shown = client.get("/v1/adapters/acme-look", headers=_as(ACME)).json()["feedback"]
        assert shown["1"]["count"] == 1 and shown["1"]["mean_score"] == 1.0 and shown["1"]["stars_mean"] == 5
        v2 = shown["2"]
        assert v2["count"] == 3 and v2["thumbs_up"] == 2 and v2["thumbs_down"] == 1, v2
        assert v2["mean_score"] == pytest.approx(2 / 3, abs=1e-3)
        assert v2["interval"][0] < 2 / 3 < v2["interval"][1]
        late = client.post("/v1/feedback", json={"request_id": unrated, "rating": 4}, headers=_as(ACME))
        assert late.status_code == 200 and late.json()["updated"] is False


def test_unknown_or_foreign_requests_are_404_and_bad_bodies_422(setup):
    with TestClient(setup()) as client:
        request_id = _generate(client, "acme-look:prod", 5)
        unknown = client.post("/v1/feedback", json={"request_id": "req-" + "0" * 24, "rating": 3},
                              headers=_as(ACME))
        foreign = client.post("/v1/feedback", json={"request_id": request_id, "rating": 3}, headers=_as(GLOBEX))
        assert unknown.status_code == foreign.status_code == 404
        assert unknown.json()["error"]["code"] == "request_not_found"
        for body in ({"request_id": request_id, "rating": 6}, {"request_id": request_id, "rating": 3, "thumb": "up"},
                     {"request_id": request_id}, {"request_id": "nope", "thumb": "up"}):
            assert client.post("/v1/feedback", json=body, headers=_as(ACME)).status_code == 422, body


def test_gateways_rating_the_same_request_at_once_all_succeed_and_keep_one_rating(database_url):
    """Several gateway replicas share one database: a rating raced by another is an update, not an
    integrity error."""
    from lorafleet.serve.feedback import FeedbackStore, StarFeedback

    stores = [FeedbackStore(database_url) for _ in range(2)]
    request_id = "req-" + "ab" * 12
    stores[0].record_request(request_id, "acme", [("race-look", 1)])
    start, outcomes = threading.Barrier(8), []

    def rate(index: int) -> None:
        start.wait()
        try:
            outcomes.append(stores[index % 2].rate(StarFeedback(request_id=request_id, rating=1 + index % 5), "acme"))
        except Exception as exc:  # what the test is about: none may fail
            outcomes.append(exc)

    threads = [threading.Thread(target=rate, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(not isinstance(outcome, Exception) for outcome in outcomes), outcomes
    assert len(outcomes) == 8 and sum(not outcome.updated for outcome in outcomes) <= 2
    shown = stores[1].by_version("race-look")
    assert shown[1].count == 1, shown  # one rating per request, whoever wrote last
    for store in stores:
        store.engine.dispose()


def test_an_unsupported_feedback_database_is_refused_naming_the_setting():
    from pydantic import ValidationError

    from lorafleet.serve.feedback import FeedbackDatabaseUnavailable, FeedbackStore

    with pytest.raises(ValidationError, match="database_url"):
        ServeSettings(base="tiny", feedback={"database_url": "mysql://lorafleet@127.0.0.1/feedback"})
    with pytest.raises(FeedbackDatabaseUnavailable, match="driver") as refused:  # e.g. a gate file's URL
        FeedbackStore("mysql+pymysql://lorafleet@127.0.0.1/feedback")
    assert refused.value.field == "feedback.database_url"


def test_a_plain_postgresql_url_uses_the_driver_the_postgres_extra_installs(postgres):
    """`postgresql://` names SQLAlchemy's default driver (psycopg2); the extra installs psycopg 3."""
    from lorafleet.serve.feedback import FeedbackStore

    plain = postgres.url.replace("postgresql+psycopg://", "postgresql://")
    ServeSettings(base="tiny", feedback={"database_url": plain})  # accepted by the settings ...
    store = FeedbackStore(plain)  # ... and by the store
    assert store.by_version("nothing-here") == {}
    store.engine.dispose()
