"""The best of several jobs at each radius: at chosen radii (``envelope``) or as an exact step curve.

A *method* is a job name without its sigma (``split_sigma``: ``MSE s=0.25`` -> ``MSE``): the jobs of one method
differ only in sigma, and its envelope takes the best of them at each radius. Ties go to the first job given.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Sequence

from dsq.errors import InvalidArgument
from dsq.report.accuracy import Jobs, JobCounts, Rows, as_results, certified_accuracy, job_counts

# What may join a method's name to its sigma ("MSE s=0.25", "cifar_sigma0.5", "a-@0.25"): the characters of
# _SIGMA_IN_NAME's separator class ([\s_,;:/-], a space for \s), stripped around the sigma when it is cut out.
_SEPARATORS = " _,;:/-"
# " s=0.25", "_sigma0.5", " (σ=1)", "@0.25" ...; the number is group 2. The look-behinds (?<![^\W_]) let "sigma",
# "σ" and "s" follow no letter or digit (an underscore may: "cifar_sigma0.5"), so "abs=0.3" names no sigma.
_SIGMA_IN_NAME = re.compile(
    r"[\s_,;:/-]*(\()?\s*"  # separators, and an opening parenthesis closed after the number
    r"(?:(?<![^\W_])(?:sigma|σ)\s*[=:_ ]?\s*|(?<![^\W_])s\s*=\s*|@)(\d+(?:\.\d+)?|\.\d+)\s*(?(1)\))",
    re.IGNORECASE)


class Envelope(NamedTuple):
    """Best certified accuracy per radius across jobs, the job attaining it (first on ties), and its clean accuracy."""

    accuracy: list[float]
    best: list[str]
    clean: list[float]


def envelope(jobs: Jobs, radii: Sequence[float]) -> Envelope:
    """Best certified accuracy per radius across ``jobs`` (e.g. one job per sigma) and which job attains it."""
    require_jobs(jobs)
    best = [best_job(job_counts(jobs, radii), j) for j in range(len(radii))]
    return Envelope([t.certified[j] / t.n for j, t in enumerate(best)], [t.label for t in best],
                    [t.clean / t.n for t in best])


def require_jobs(jobs: Jobs) -> Jobs:
    """``jobs`` when there is at least one: an envelope of no job is InvalidArgument."""
    if not jobs:
        raise InvalidArgument("envelope needs at least one job")
    return jobs


def best_job(table: Sequence[JobCounts], j: int) -> JobCounts:
    """The job with the highest certified accuracy at the j-th radius (max() keeps the first of equals)."""
    return max(table, key=lambda t: t.certified[j] / t.n)


def curve(rows: Rows, max_radius: float) -> tuple[list[float], list[float]]:
    """Exact step curve of certified accuracy on [0, max_radius]: breakpoints and the accuracy at each.

    Accuracy is constant on each interval (r_k, r_k+1] between breakpoints (draw with ``steps-pre``).
    """
    return envelope_curve([rows], max_radius)


def envelope_curve(jobs_rows: Sequence[Rows], max_radius: float) -> tuple[list[float], list[float]]:
    """The step curve of the best certified accuracy of several jobs at each radius (one job: its :func:`curve`)."""
    jobs_rows = [as_results(rows) for rows in jobs_rows]
    breaks = {x.radius for results in jobs_rows for x in results if x.correct and 0.0 < x.radius < max_radius}
    radii = [0.0] + sorted(breaks) + [max_radius]
    return radii, [max(column) for column in zip(*(certified_accuracy(rows, radii) for rows in jobs_rows))]


def split_sigma(name: str) -> tuple[str, float | None]:
    """``"MSE s=0.25"`` -> ``("MSE", 0.25)``: a job name without its sigma (the method), and that sigma.

    A sigma is written ``s=0.25``, ``sigma=0.25``, ``sigma 0.25``, ``sigma0.25``, ``σ=0.25`` or ``@0.25``,
    in any case, anywhere in the name (``"cifar_sigma0.5 (bf16)"`` -> ``("cifar (bf16)", 0.5)``);
    a name without one is returned whole, with None.
    """
    match = _SIGMA_IN_NAME.search(name)
    if match is None:
        return name, None
    before, after = name[:match.start()].rstrip(_SEPARATORS), name[match.end():]
    rest = after.lstrip(_SEPARATORS)
    between = after[:len(after) - len(rest)] or name[len(before):match.start()] or " "
    return (before + between + rest if before and rest else before + rest), float(match.group(2))
