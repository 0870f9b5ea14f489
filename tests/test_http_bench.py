"""The HTTP bench's own arithmetic (the bench itself is a command that prints numbers)."""

from __future__ import annotations

from lorafleet.benchmarks.http_bench import _breakdown, _zipf_calls


def test_zipf_traffic_repeats_about_the_asked_share_and_repeats_are_identical_requests():
    for seed in range(3):
        calls, share = _zipf_calls(64, 0.3, seed)
        assert len(calls) == 64 and abs(share - 0.3) < 0.05
        assert 1 - len(set(calls)) / len(calls) == share  # a repeated prompt carries its seed: the same request
        assert all(adapter is None for adapter, _, _ in calls)
    assert not set(_zipf_calls(64, 0.3, 0)[0]) & set(_zipf_calls(64, 0.3, 1)[0])  # rounds do not share prompts


def test_the_breakdown_separates_http_and_ray_from_the_server_stages():
    rows = [{"client_ms": 120.0, "total_ms": 100.0, "generation_ms": 80.0,
             "breakdown": {"checks": 0.1, "backend": 95.0, "replica": 90.0, "encode": 1.0}}] * 3
    out = _breakdown(rows)
    assert out["http_and_proxy"] == 20.0 and out["ray_handle"] == 5.0 and out["pass"] == 80.0
    assert out["client_total"] == 120.0 and out["checks"] == 0.1 and out["outside_pass"] == 40.0
