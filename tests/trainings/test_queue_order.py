"""The training queue's order: oldest first, but a tenant with fewer trainings running goes first.

Pure scheduling logic (which queued record starts next), so it is tested on records directly; the
Ray side of starting them is covered by tests/trainings/test_training_service.py.
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

from lorafleet.training.service.records import PublishTarget, TrainingRecord, new_training_id, now
from lorafleet.training.service.scheduler import starting_order

DATASET = "sha256:" + "0" * 64


def _queued(tenant: str | None, minutes_ago: int) -> TrainingRecord:
    return TrainingRecord(id=new_training_id(), tenant=tenant, config={}, dataset=DATASET,
                          publish=PublishTarget(name=f"{tenant or 'x'}-style"),
                          created_at=now() - timedelta(minutes=minutes_ago))


def _tenants(records: list[TrainingRecord]) -> list[str | None]:
    return [r.tenant for r in records]


def test_without_tenants_the_oldest_starts_first():
    newer, older = _queued(None, 1), _queued(None, 5)
    assert starting_order([newer, older], Counter(), free=2) == [older, newer]


def test_a_burst_of_one_tenant_does_not_hold_back_another():
    burst = [_queued("team-a", 10 - i) for i in range(5)]  # all older than B's one training
    late = _queued("team-b", 0)
    assert _tenants(starting_order(burst + [late], Counter(), free=2)) == ["team-a", "team-b"]


def test_a_tenant_already_running_waits_behind_one_that_is_not():
    a, b = _queued("team-a", 9), _queued("team-b", 1)
    assert starting_order([a, b], Counter({"team-a": 1}), free=1) == [b]


def test_free_slots_bound_the_starts_and_running_counts_are_not_changed():
    records = [_queued("team-a", 3), _queued("team-a", 2), _queued("team-b", 1)]
    running = Counter({"team-b": 2})
    assert _tenants(starting_order(records, running, free=3)) == ["team-a", "team-a", "team-b"]
    assert starting_order(records, running, free=0) == []
    assert running == Counter({"team-b": 2})
