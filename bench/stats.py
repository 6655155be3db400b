"""Seed statistics shared by the accuracy benchmark and its report: the mean, the sample std and the 95 %
confidence interval of the mean (Student's t), and paired differences between two rows' seeds."""

from __future__ import annotations

import statistics


def ci(xs: list[float]) -> tuple[float, float, float]:
    """(mean, sample std, half-width of the 95 % confidence interval of the mean, Student's t)."""
    n = len(xs)
    mean = statistics.mean(xs)
    if n < 2:
        return mean, 0.0, 0.0
    from scipy.stats import t

    sd = statistics.stdev(xs)
    return mean, sd, float(t.ppf(0.975, n - 1)) * sd / n ** 0.5


def paired(row: dict, base: dict) -> dict | None:
    """The per-seed test-accuracy difference row - base over their common seeds: mean and 95 % CI."""
    seeds = [s for s in row["per_seed"] if s in base["per_seed"]]
    if not seeds:
        return None
    mean, _, half = ci([row["per_seed"][s] - base["per_seed"][s] for s in seeds])
    return {"mean": mean, "ci95": half, "seeds": len(seeds)}
