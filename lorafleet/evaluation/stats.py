"""Intervals and tests, small enough to own (no scipy): Wilson intervals for proportions, normal
intervals for means, Pearson's chi-square against a target distribution (its p-value from the
regularized upper incomplete gamma function), KL divergence."""

from __future__ import annotations

# Imports inside functions: torch (for the incomplete gamma function) only when a test runs.
import math
import statistics

Z95 = 1.959964


def wilson(successes: int, n: int) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high), the 95 % normal interval of the mean."""
    if not values:
        return math.nan, math.nan, math.nan
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    half = Z95 * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def chi_square(observed: list[int], expected_share: list[float]) -> tuple[float, int, float]:
    """(statistic, degrees of freedom, p-value) of observed counts against expected shares."""
    total = sum(observed)
    pairs = [(o, e * total) for o, e in zip(observed, expected_share) if e > 0]
    statistic = sum((o - e) ** 2 / e for o, e in pairs)
    dof = max(1, len(pairs) - 1)
    import torch

    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                            torch.tensor(statistic / 2, dtype=torch.float64)))
    return statistic, dof, p_value


def kl_divergence(observed_share: list[float], target_share: list[float], epsilon: float = 1e-6) -> float:
    """KL(observed || target) in nats; shares are smoothed by ``epsilon`` so empty bins stay finite."""
    p = [s + epsilon for s in observed_share]
    q = [s + epsilon for s in target_share]
    p_total, q_total = sum(p), sum(q)
    return sum((a / p_total) * math.log((a / p_total) / (b / q_total)) for a, b in zip(p, q))
