"""Ray Serve autoscaling on a local cluster: a bounded burst scales replicas up, then down."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_a_burst_scales_generator_replicas_up_and_they_come_back_down():
    from lorafleet.benchmarks.autoscale_bench import run_autoscale

    result = run_autoscale(burst_requests=40, concurrency=8, steps=30, settle_s=60)
    assert result["errors"] == 0 and result["ok"] == 40
    assert result["peak_replicas"] >= 2, result
    assert result["final_replicas"] == 1 and result["back_to_min_after_burst_s"] is not None, result
