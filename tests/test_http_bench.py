"""The HTTP bench's own arithmetic (the bench itself is a command that prints numbers)."""

from __future__ import annotations

from lorafleet.benchmarks.http_bench import (
    SCENARIOS,
    Scenario,
    _breakdown,
    _idle_overheads,
    _images_per_pass,
    _pass_ms_per_image,
    _ratio_within_rounds,
    _ratios_to_none,
    _scenario_calls,
    _zipf_calls,
    round_bursts,
)


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


def test_the_idle_overhead_beside_ray_is_the_median_difference_within_pairs():
    """One pair met a slow moment of the machine: the difference of medians would call it
    lorafleet's (60 ms), the median within pairs does not (10 ms)."""
    rows = [{"client_ms": client, "direct_ms": direct} for client, direct in ((110, 100), (305, 300), (260, 200))]
    out = _idle_overheads(rows, without_ray=150.0)
    assert out["http_idle_overhead_beside_ray_ms"] == 10.0 and out["direct_beside_ray_ms"] == 200.0
    assert out["http_idle_overhead_beside_ray_pct"] == 5.0 and out["http_idle_pairs"] == 3
    assert out["http_idle_overhead_without_ray_ms"] == 110.0 and out["ray_idle_slows_direct_pct"] == 33.3


def test_throughput_ratios_are_taken_within_rounds():
    """The machine ran 30 % slower in the second round, and one round was noisy: each round's ratio
    is 0.95, 0.95, 0.84, so 0.95; the ratio of the medians over rounds (8.0 / 9.5) would say 0.84."""
    assert _ratio_within_rounds([9.5, 6.65, 8.0], [10.0, 7.0, 9.5]) == 0.95
    assert _ratio_within_rounds([10.0, 7.0], [10.0, 7.0]) == 1.0
    assert _ratios_to_none({"0": [10.0, 7.0, 9.5], "100": [9.5, 6.65, 8.0]}) == {
        "http_100_to_0": 0.95, "http_100_to_0_rounds": [0.95, 0.95, 0.842]}


def _seconds_per_scenario(bursts, drift: float) -> dict[str, float]:
    """A machine that slows steadily: the k-th request of the round takes 1 + drift * k seconds,
    whatever its scenario (every scenario costs the same)."""
    seconds, sent = {}, 0
    for label, calls in bursts:
        for _ in calls:
            seconds[label] = seconds.get(label, 0.0) + 1 + drift * sent
            sent += 1
    return seconds


def test_a_round_mirrors_its_halves_so_a_steady_drift_costs_every_scenario_alike():
    scenarios = (Scenario("0", 0), Scenario("1", 1), Scenario("100", 100))
    for round_index, order in ((0, ["0", "1", "100", "100", "1", "0"]), (1, ["100", "1", "0", "0", "1", "100"])):
        bursts = round_bursts(scenarios, 64, round_index)
        assert [label for label, _ in bursts] == order
        for scenario in scenarios:  # each scenario sends its own traffic, once, in two halves
            halves = [calls for label, calls in bursts if label == scenario.label]
            assert [len(calls) for calls in halves] == [32, 32]
            assert halves[0] + halves[1] == _scenario_calls(scenario.adapters, 64, round_index)
        seconds = _seconds_per_scenario(bursts, drift=0.001)
        assert max(seconds.values()) - min(seconds.values()) < 1e-9
    one_after_another = [(s.label, _scenario_calls(s.adapters, 64, 0)) for s in scenarios]
    seconds = _seconds_per_scenario(one_after_another, drift=0.001)
    assert seconds["0"] / seconds["100"] < 0.9  # the former order: 100 adapters at 0.89x none, all drift


def test_no_adapter_runs_twice_per_round_as_the_bench_own_noise():
    labels = [label for label, _ in round_bursts(SCENARIOS, 8, 0)]
    assert labels.count("0") == labels.count("0_again") == 2
    control = next(s for s in SCENARIOS if s.label == "0_again")
    assert control.adapters == 0 and _scenario_calls(0, 8, 0) == [(None,)] * 8


def test_images_per_pass_counts_passes_not_requests():
    """Passes of 1 and 7 images, alternately: 4 per pass (the requests' own mean would say 6.25)."""
    rows = [{"batch_images": 1}] + [{"batch_images": 7}] * 7
    assert _images_per_pass(rows * 8) == 4.0
    assert _images_per_pass([{"batch_images": 8}] * 64) == 8.0


def test_pass_time_per_image_weighs_each_pass_once():
    """A pass of 1 image in 100 ms and one of 4 images in 200 ms: 300 ms over 5 images."""
    rows = [{"batch_images": 1, "generation_ms": 100.0}] + [{"batch_images": 4, "generation_ms": 200.0}] * 4
    assert _pass_ms_per_image(rows) == 60.0
