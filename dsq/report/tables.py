"""Tables of certified accuracy as strings, and the rich table that prints them.

Comparison tables follow the Denoised Smoothing paper's Tables 1-2 ("standard accuracy is in parenthesis"): one row
per job, one column per radius, every cell ``A (C)`` with A the certified accuracy in percent and C the clean
accuracy of the job that produced A: the smoothed classifier's accuracy at r = 0 unless the caller passes another
(e.g. the base classifier's accuracy without noise). In an envelope row (the best job per radius, e.g. across
sigma) C is the clean accuracy of the job attaining that cell, so it can differ from cell to cell, as in the paper.

A *sequential* job (a target radius r, ``dsq.sequential``) answers one question per image: certified within
radius >= r, or not. Its certified accuracy at r is the fraction of images correct and certified; at any other
radius it answers nothing (its stored radii are lower bounds, not the largest radius the samples allow), so its
table (``sequential_table``) has that one number and what it cost: samples (or queries) per image.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from dsq.errors import InvalidArgument
from dsq.report.accuracy import Jobs, JobCounts, Rows, job_counts
from dsq.report.envelopes import best_job, require_jobs
from dsq.report.intervals import optional_interval
from dsq.text import safe


def accuracy_title(ci: float | None = None) -> str:
    """What a table's cells are: ``certified accuracy % (clean)``, with ``[95% CI]`` when they carry intervals."""
    return "certified accuracy % " + ("" if ci is None else f"[{100 * (1 - ci):g}% CI] ") + "(clean)"


def compare_header(radii: Sequence[float], first: str = "job") -> list[str]:
    """Column titles of :func:`compare_table`: the job label, then ``r = 0.25`` ... per radius."""
    return [first] + [f"r = {r:g}" for r in radii]


def format_cell(accuracy: float, clean: float, decimals: int = 1,
                interval: tuple[float, float] | None = None) -> str:
    """``"57.0 (71.2)"``: certified accuracy, clean accuracy in parentheses, both in percent.

    With a confidence ``interval`` (fractions) on the certified accuracy: ``"57.0 [47.1, 66.5] (71.2)"``.
    """
    return f"{percent(accuracy, decimals, interval)} ({100 * clean:.{decimals}f})"


def percent(fraction: float, decimals: int, interval: tuple[float, float] | None = None) -> str:
    text = f"{100 * fraction:.{decimals}f}"
    if interval is not None:
        text += f" [{100 * interval[0]:.{decimals}f}, {100 * interval[1]:.{decimals}f}]"
    return text


def _cell(t: JobCounts, j: int, decimals: int, ci: float | None, clean: float | None = None) -> str:
    """The j-th radius of one job as a cell; ``ci`` (an alpha) adds the Clopper-Pearson interval over its images."""
    clean = t.clean / t.n if clean is None else clean
    return format_cell(t.certified[j] / t.n, clean, decimals, optional_interval(t.certified[j], t.n, ci))


def compare_table(
    jobs: Jobs,
    radii: Sequence[float],
    *,
    clean: Mapping[str, float] | None = None,
    decimals: int = 1,
    ci: float | None = None,
) -> list[list[str]]:
    """One row of strings per job: its label, then ``A (C)`` per radius (see the module docstring).

    ``clean`` maps a job label to another clean accuracy (a fraction, e.g. the base classifier's without noise).
    ``ci`` (an alpha, e.g. 0.05) adds to each cell the two-sided Clopper-Pearson interval of A over the images.
    """
    return [[t.label] + [_cell(t, j, decimals, ci, (clean or {}).get(t.label)) for j in range(len(radii))]
            for t in job_counts(jobs, radii)]


def envelope_row(jobs: Jobs, radii: Sequence[float], *, label: str = "envelope", decimals: int = 1,
                 ci: float | None = None) -> list[str]:
    """The envelope (``envelopes.envelope``) as a row; each cell carries the clean accuracy of the job attaining it.

    With ``ci``, a cell's interval is that job's: it does not account for picking the best of several jobs.
    """
    table = job_counts(require_jobs(jobs), radii)
    return [label] + [_cell(best_job(table, j), j, decimals, ci) for j in range(len(radii))]


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, title: str | None = None):
    """A ``rich.table.Table`` with ``header`` and string ``rows`` (first column left, the others right-aligned).

    Every string is printed as it is: job names, labels and titles are user text, so control characters show
    as escapes and rich markup as written (``dsq.text.safe``), never as colours or terminal commands.
    """
    from rich.table import Table

    table = Table(title=None if title is None else safe(title))
    for k, name in enumerate(header):
        table.add_column(safe(name), justify="left" if k == 0 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*(safe(cell) for cell in row))
    return table


def sequential_header(unit: str = "samples") -> list[str]:
    """Column titles of :func:`sequential_table`; ``unit`` is what an image costs (samples, queries)."""
    return ["job", "target radius", "certified accuracy %", f"mean {unit}/image", f"median {unit}/image", "images"]


def sequential_table(jobs: Sequence[tuple[str, Rows, Sequence[float]]], radius: float, *,
                     decimals: int = 1, ci: float | None = None) -> list[list[str]]:
    """One row per sequential job at target ``radius``: (label, rows, cost per image in the rows' order).

    The cost is what each image took: estimation samples drawn, or queries billed for an API job. ``ci`` (an
    alpha) adds the Clopper-Pearson interval of the certified accuracy over the images.
    """
    table = []
    for label, rows, costs in jobs:
        [t] = job_counts([(label, rows)], [radius])
        mean, median = cost_summary(costs)
        accuracy = percent(t.certified[0] / t.n, decimals, optional_interval(t.certified[0], t.n, ci))
        table.append([label, f"{radius:g}", accuracy, f"{mean:,.0f}", f"{median:,.0f}", str(len(costs))])
    return table


def sequential_note(radius: float) -> str:
    """What a sequential job does not answer, in one line."""
    return (f"a sequential job answers only 'certified within radius >= {radius:g}, or not' per image; it does not "
            f"answer other radii (certify with a fixed n for accuracy at every radius)")


def cost_summary(costs: Sequence[float]) -> tuple[float, float]:
    """(mean, median) of per-image costs; InvalidArgument when there are none."""
    if not costs:
        raise InvalidArgument("no certified images: samples per image need at least one result row")
    ordered = sorted(float(c) for c in costs)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return sum(ordered) / len(ordered), median
