"""Scaling exponents: the log-log slope of a cost against length, so "linear vs quadratic" is a number.

A slope near 1 means cost grows linearly with length, near 2 quadratically. Short lengths are
dominated by fixed overheads (kernel launches, weights), so the fit uses only the long end.
"""

from __future__ import annotations

import math


def fit_range(lengths: list[int], fit_min_len: int | None) -> int:
    """The smallest length that enters the fit: ``fit_min_len``, else the median length (the top half)."""
    if fit_min_len is not None:
        return int(fit_min_len)
    ordered = sorted(lengths)
    return ordered[(len(ordered) - 1) // 2] if ordered else 0


def loglog_slope(points: list[tuple[float, float | None]], min_x: float) -> float | None:
    """Least-squares slope of log(y) on log(x) over points with x >= min_x and y > 0; None with fewer than two."""
    pts = [(math.log(x), math.log(y)) for x, y in points if x >= min_x and y is not None and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
