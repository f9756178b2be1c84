"""Certified accuracy against radius as plotly traces: a step curve per job with its Clopper-Pearson band, each
method's envelope (the best of its jobs at each radius), and a sequential job's one point.

The curves are drawn on a grid of ``POINTS`` radii (and the table's radii): an experiment of 10,000 images has as
many breakpoints per job, more than a page needs. The jobs' tallies (``views.tallied``) count them in the database:
their correct images per step of the grid, exact counts at the table's radii, the largest radius (the axis). The
grid's radii are where the steps start (``edge``), so a curve's counts are exact there too.
"""

from __future__ import annotations

import math
from typing import Sequence

from dsq import views
from dsq.report import summary

POINTS = views.CURVE_POINTS  # grid radii per curve


def axis_end(jobs: Sequence[summary.Job]) -> float:
    """Where the radius axis ends: a little past the largest certified radius (or sequential target)."""
    return views.curve_end([job.tally.largest for job in jobs], [job.target or 0.0 for job in jobs])


def grid(end: float, radii: Sequence[float] = ()) -> list[float]:
    """The radii a curve is drawn at: where each of its steps starts (``edge``), and the table's."""
    per = POINTS / end  # as views.tallied counts the steps
    return sorted({edge(k, per) for k in range(POINTS + 1)} | {r for r in radii if r <= end})


def edge(k: int, per: float) -> float:
    """Where step k starts: the smallest radius r with floor(r * per) >= k, as the database computes it. A count
    of the steps from k up is then the count of radii >= this one, exactly."""
    r = k / per
    while r * per < k:
        r = math.nextafter(r, math.inf)
    while r > 0 and math.nextafter(r, 0) * per >= k:
        r = math.nextafter(r, 0)
    return r


def certified(job: summary.Job, radii: Sequence[float], end: float) -> list[int]:
    """How many images are correct and certified at radius >= r, for each r of ``grid(end, ...)``: a radius the
    job's tally counted, exactly; a grid radius, from the tally's steps of ``end / POINTS``."""
    exact = dict(zip(job.tally.radii, job.tally.certified))
    steps = job.tally.steps
    above = [0] * (len(steps) + 1)  # above[k]: correct images in steps k and up
    for k in range(len(steps) - 1, -1, -1):
        above[k] = above[k + 1] + steps[k]
    return [exact[r] if r in exact else above[min(round(r * POINTS / end), len(steps))] for r in radii]


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
    """The plot of ``jobs`` (with their tallies, ``views.tallied``): ``{"traces": [...], "end": radius}``; each
    trace has its kind (curve, band, envelope, point), label, method, and x/y (a band: its lower and upper y)."""
    end = axis_end(jobs)
    xs = grid(end, radii)
    found = []
    methods: dict[str, list[list[float]]] = {}
    for job in jobs:
        n = job.tally.n
        if job.target is not None:
            k = job.tally.at(job.target)
            point = {"kind": "point", "label": job.label, "method": job.method, "x": [job.target], "y": [k / n]}
            if alpha is not None:
                (low,), (high,) = bands([k], n, alpha)
                point.update(low=[low], high=[high])
            found.append(point)
            continue
        counts = certified(job, xs, end)
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
