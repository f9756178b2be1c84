"""Certified accuracy against radius as plotly traces: a step curve per job with its Clopper-Pearson band, each
method's envelope (the best of its jobs at each radius), and a sequential job's one point.

The curves are drawn on a grid of ``POINTS`` radii (and the table's radii): an experiment of 10,000 images has as
many breakpoints per job, more than a page needs. The tables, not the curves, carry the exact numbers.
"""

from __future__ import annotations

import bisect
from typing import Sequence

from dsq.report import summary

POINTS = 200  # grid radii per curve
MARGIN, FLOOR = 1.05, 0.5  # the axis ends 5% past the largest certified radius, at FLOOR at least


def axis_end(jobs: Sequence[summary.Job]) -> float:
    """Where the radius axis ends: a little past the largest certified radius (or sequential target)."""
    largest = max([x.radius for job in jobs for x in job.rows if x.correct]
                  + [job.target or 0.0 for job in jobs], default=0.0)
    return max(FLOOR, largest * MARGIN)


def grid(end: float, radii: Sequence[float] = ()) -> list[float]:
    return sorted({end * k / POINTS for k in range(POINTS + 1)} | {r for r in radii if r <= end})


def certified(job: summary.Job, radii: Sequence[float]) -> list[int]:
    """How many images are correct and certified at radius >= r, for each r (one sort, one bisection per r)."""
    found = sorted(x.radius for x in job.rows if x.correct)
    return [len(found) - bisect.bisect_left(found, r) for r in radii]


def bands(counts: Sequence[int], n: int, alpha: float) -> tuple[list[float], list[float]]:
    """Two-sided Clopper-Pearson bounds of k of n for every k in ``counts``, as ``intervals.clopper_pearson`` gives
    them, vectorised: the Beta quantile is scipy.special's inverse incomplete beta (scipy.stats costs seconds to
    import, scipy.special is loaded already)."""
    import numpy as np
    from scipy.special import betaincinv

    k = np.asarray(counts, dtype=float)
    with np.errstate(all="ignore"):
        lower = np.where(k == 0, 0.0, betaincinv(k, n - k + 1, alpha / 2))
        upper = np.where(k == n, 1.0, betaincinv(k + 1, n - k, 1 - alpha / 2))
    return lower.tolist(), upper.tolist()


def traces(jobs: Sequence[summary.Job], radii: Sequence[float] = (), *, alpha: float | None = 0.05,
           envelope: bool = True) -> dict:
    """The plot of ``jobs``: ``{"traces": [...], "end": radius}``; each trace has its kind (curve, band,
    envelope, point), label, method, and x/y (a band: its lower and upper y)."""
    end = axis_end(jobs)
    xs = grid(end, radii)
    found = []
    methods: dict[str, list[list[float]]] = {}
    for job in jobs:
        n = len(job.rows)
        if job.target is not None:
            [k] = certified(job, [job.target])
            point = {"kind": "point", "label": job.label, "method": job.method, "x": [job.target], "y": [k / n]}
            if alpha is not None:
                (low,), (high,) = bands([k], n, alpha)
                point.update(low=[low], high=[high])
            found.append(point)
            continue
        counts = certified(job, xs)
        ys = [k / n for k in counts]
        if alpha is not None:
            low, high = bands(counts, n, alpha)
            found.append({"kind": "band", "label": job.label, "method": job.method, "x": xs, "low": low,
                          "high": high})
        found.append({"kind": "curve", "label": job.label, "method": job.method, "sigma": job.sigma, "x": xs,
                      "y": ys})
        methods.setdefault(job.method, []).append(ys)
    if envelope:
        for method, curves in methods.items():
            if len(curves) > 1:
                found.append({"kind": "envelope", "label": f"{method} envelope".strip(), "method": method, "x": xs,
                              "y": [max(column) for column in zip(*curves)]})
    return {"traces": found, "end": end}
