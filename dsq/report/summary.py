"""One table of results, whatever its format: a line per job (per class, per envelope), its notes, and the same
numbers as text cells (table, Markdown, LaTeX) or as records (CSV, JSON).

Per line: the certified accuracy at each radius with the clean accuracy beside it (``tables.format_cell``), the
average certified radius (ACR: the mean over images of the radius, 0 for an abstain or a wrong class) and the
abstain rate. A *sequential* job answers one radius only (its target): every other cell is None, "not answered",
and so are its clean accuracy, ACR and abstain rate (its radii are lower bounds and its abstains mean "not
certified at the target"). A cell beyond the largest radius a job can certify (``Job.cap``) is 0 by construction
and marked. The notes say so, name partial jobs and, under ``SMALL_RUN`` images, how wide a percentage's interval is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, NamedTuple, Sequence

from dsq.report.accuracy import Tally, as_results, tally
from dsq.report.intervals import DEFAULT_ALPHA, optional_interval
from dsq.report.tables import percent

NOT_ANSWERED = "—"  # a cell a job does not answer, in the text formats; null in JSON, n/a in CSV
CAPPED = "†"  # after a cell beyond the largest radius its job can certify
SMALL_RUN = 100  # below this many images, a table says how uncertain its percentages are
# The steps automatic radii are chosen from: the smallest that spans the certifiable range in at most MAX_COLUMNS.
RADIUS_STEPS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
MAX_COLUMNS = 8


class Job(NamedTuple):
    """A job to report: its label and results, its method and sigma (envelopes, plots), the one radius a sequential
    job answers (``target``), the largest radius it can certify (``cap``), a partial job's note, its id, and its
    image's size d when its radii were turned into L∞ ones; ``tally``, when given, is what its line counts
    (``accuracy.Tally``, counted by the database: then ``rows`` may be None, not loaded)."""

    label: str
    rows: list | None
    method: str = ""
    sigma: float | None = None
    target: float | None = None
    cap: float | None = None
    partial: str | None = None
    job_id: int | None = None
    dimension: int | None = None  # d, when the radii are L∞ (R / sqrt(d)); None: L2
    tally: Tally | None = None

    @property
    def images(self) -> int:
        return self.tally.n if self.tally is not None else len(self.rows)


@dataclass(frozen=True)
class Cell:
    accuracy: float
    clean: float | None  # None: not answered (a sequential job)
    interval: tuple[float, float] | None
    capped: bool


@dataclass(frozen=True)
class Line:
    label: str
    images: str
    cells: list  # Cell, or None where not answered
    acr: float | None
    abstain: float | None
    partial: bool = False
    klass: int | None = None


class Table(NamedTuple):
    radii: list[float]
    lines: list[Line]
    notes: list[str]


def answers(job: Job, radius: float) -> bool:
    return job.target is None or math.isclose(radius, job.target)


def job_line(job: Job, radii: Sequence[float], ci: float | None = None, *, rows=None, label: str | None = None,
             klass: int | None = None) -> Line:
    """One job's line (or, with ``rows`` and ``klass``, that of its images of one class): from its ``tally`` when
    it has one, else counted from its rows."""
    counted = job.tally if rows is None and job.tally is not None else tally(job.rows if rows is None else rows,
                                                                              radii)
    n = counted.n
    clean = None if job.target is not None else counted.clean / n
    cells = []
    for r in radii:
        if not answers(job, r):
            cells.append(None)
            continue
        k = counted.at(r)
        cells.append(Cell(k / n, clean, optional_interval(k, n, ci), job.cap is not None and r > job.cap))
    fixed = job.target is None
    return Line(label or job.label, str(n), cells, counted.radius_sum / n if fixed else None,
                counted.abstains / n if fixed else None, job.partial is not None, klass)


def class_lines(job: Job, radii: Sequence[float], ci: float | None = None) -> list[Line]:
    """A line per class of the job's images (by true label)."""
    results = as_results(job.rows)
    return [job_line(job, radii, ci, rows=[x for x in results if x.label == c], label=f"{job.label}: class {c}",
                     klass=c) for c in sorted({x.label for x in results})]


def envelope_line(jobs: Sequence[Job], radii: Sequence[float], label: str, ci: float | None = None, *,
                  klass: int | None = None) -> Line:
    """The best job at each radius among those that answer it (first of equals); ACR the best job's.

    The abstain rate is a job's, not a radius's: only an envelope of one job has one. With ``klass``, the envelope
    of the jobs' images of that class.
    """
    lines = [job_line(job, radii, ci) if klass is None else
             job_line(job, radii, ci, rows=[x for x in as_results(job.rows) if x.label == klass], klass=klass)
             for job in jobs]
    cells = []
    for j in range(len(radii)):
        answered = [line.cells[j] for line in lines if line.cells[j] is not None]
        cells.append(max(answered, key=lambda c: c.accuracy) if answered else None)
    acrs = [line.acr for line in lines if line.acr is not None]
    sizes = sorted({int(line.images) for line in lines})
    images = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    return Line(label, images, cells, max(acrs) if acrs else None, lines[0].abstain if len(lines) == 1 else None,
                any(line.partial for line in lines), klass)


def class_envelope_lines(jobs: Sequence[Job], radii: Sequence[float], label: str,
                         ci: float | None = None) -> list[Line]:
    """An envelope line per class among the jobs' images (a class some job lacks: the envelope of those that have
    it)."""
    classes = sorted({x.label for job in jobs for x in as_results(job.rows)})
    lines = []
    for c in classes:
        having = [job for job in jobs if any(x.label == c for x in as_results(job.rows))]
        lines.append(envelope_line(having, radii, f"{label}: class {c}", ci, klass=c))
    return lines


def build(jobs: Sequence[Job], radii: Sequence[float], *, ci: float | None = None, by_class: bool = False,
          envelopes: Sequence[tuple[str, Sequence[Job]]] = ()) -> Table:
    """The table of ``jobs`` at ``radii``: their lines (and their classes'), then one per envelope (and its
    classes'), and its notes, which cover the jobs of the envelopes too (an experiment's table may have no other)."""
    lines = []
    for job in jobs:
        lines.append(job_line(job, radii, ci))
        lines += class_lines(job, radii, ci) if by_class else []
    for label, group in envelopes:
        lines.append(envelope_line(group, radii, label, ci))
        lines += class_envelope_lines(group, radii, label, ci) if by_class else []
    return Table(list(radii), lines, notes(_distinct([*jobs, *(job for _, group in envelopes for job in group)]),
                                           radii, lines))


def _distinct(jobs: Sequence[Job]) -> list[Job]:
    """Each job once (by identity: a Job holds lists, so it cannot be hashed), in order."""
    found: list[Job] = []
    for job in jobs:
        if not any(job is seen for seen in found):
            found.append(job)
    return found


def notes(jobs: Sequence[Job], radii: Sequence[float], lines: Sequence[Line]) -> list[str]:
    """What a reader must know to read the table right, one line each."""
    found = []
    targets = sorted({job.target for job in jobs if job.target is not None})
    if any(cell is None for line in lines for cell in line.cells) or targets:
        found.append(f"{NOT_ANSWERED}: not answered. A sequential job answers only 'certified at radius >= R, or "
                     f"not' at its own R ({', '.join(f'{t:g}' for t in targets)}): no other radius, no clean "
                     f"accuracy, ACR or abstain rate")
    capped: dict[str, list[str]] = {}  # one line per cap: jobs of one sigma, n and alpha share it
    for job in jobs:
        if job.cap is not None and radii and max(radii) > job.cap:
            capped.setdefault(f"{job.cap:.3g}", []).append(job.label)
    for cap, labels in capped.items():
        its = "its" if len(labels) == 1 else "their"
        found.append(f"{CAPPED} {', '.join(labels)}: no radius above {cap} can be certified at {its} sigma, n and "
                     f"alpha, so {its} cells beyond are 0 by construction")
    found += [f"{job.label}: {job.partial}" for job in jobs if job.partial is not None]
    smallest = min((job.images for job in jobs), default=SMALL_RUN)
    if smallest < SMALL_RUN:
        found.append(f"{smallest} image{'s' if smallest > 1 else ''} (the fewest of a job here): a percentage is "
                     f"uncertain by up to ±{100 * spread(smallest):.0f} points (95% Wilson interval); compare "
                     f"methods on more images")
    return found


def spread(n: int, alpha: float = DEFAULT_ALPHA) -> float:
    """The widest half-width of a (1 - alpha) Wilson interval on a proportion of n (at 1/2): z / (2 sqrt(n + z^2))."""
    z = NormalDist().inv_cdf(1 - alpha / 2)
    return z / (2 * math.sqrt(n + z * z))


def header(table: Table, *, first: str = "job", images: bool = False) -> list[str]:
    return ([first] + (["images"] if images else []) + [f"r = {r:g}" for r in table.radii]
            + ["ACR", "abstain %"])


def text_rows(table: Table, *, images: bool = False, decimals: int = 1) -> list[list[str]]:
    """The table's lines as strings: ``A (C)`` cells, not-answered and capped cells marked, partial labels marked."""
    def cell(c: Cell | None) -> str:
        if c is None:
            return NOT_ANSWERED
        text = percent(c.accuracy, decimals, c.interval) + (CAPPED if c.capped else "")
        return text if c.clean is None else f"{text} ({100 * c.clean:.{decimals}f})"  # as tables.format_cell

    rows = []
    for line in table.lines:
        label = line.label + (" (partial)" if line.partial and line.klass is None else "")
        rows.append([label] + ([line.images] if images else []) + [cell(c) for c in line.cells]
                    + [NOT_ANSWERED if line.acr is None else f"{line.acr:.3f}",
                       NOT_ANSWERED if line.abstain is None else f"{100 * line.abstain:.{decimals}f}"])
    return rows


def records(table: Table) -> list[dict[str, Any]]:
    """The table's lines as plain dicts (fractions, None where not answered), for CSV and JSON."""
    out = []
    for line in table.lines:
        item: dict[str, Any] = {"label": line.label, "class": line.klass, "images": line.images,
                                "partial": line.partial}
        for r, c in zip(table.radii, line.cells):
            item[f"r={r:g}"] = None if c is None else c.accuracy
        answered = [c for c in line.cells if c is not None]
        item["clean"] = answered[0].clean if answered and len({c.clean for c in answered}) == 1 else None
        item.update(acr=line.acr, abstain_rate=line.abstain)
        for r, c in zip(table.radii, line.cells):
            if c is not None and c.interval is not None:
                item[f"r={r:g} interval"] = list(c.interval)
        out.append(item)
    return out


def auto_radii(caps: Sequence[float], targets: Sequence[float] = (), fallback: Sequence[float] = ()) -> list[float]:
    """Radii from 0 to the largest certifiable radius in round steps (at most MAX_COLUMNS), with every sequential
    target; ``fallback`` when no cap is known."""
    limit = max(caps, default=None)
    if limit is None or limit <= 0:
        return sorted({*fallback, *targets})
    step = next((s for s in RADIUS_STEPS if math.floor(limit / s) + 1 <= MAX_COLUMNS), RADIUS_STEPS[-1])
    return sorted({round(k * step, 10) for k in range(math.floor(limit / step) + 1)} | set(targets))
