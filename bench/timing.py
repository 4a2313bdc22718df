"""Summaries shared by the bench scripts."""

from __future__ import annotations

import statistics


def quantiles_ms(samples: list[float]) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) of per-call times in ms."""
    q = statistics.quantiles(samples, n=10)
    return statistics.median(samples), q[1], q[7]
