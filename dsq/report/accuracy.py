"""Per-image result rows and their certified accuracy, as in Cohen et al. (2019) and Salman et al. (2020).

Input rows are any objects or dicts with ``image_index, label, prediction, radius`` and optionally ``correct`` and
``seconds`` (database rows, dicts read back from JSON, ...); nothing here touches a database or the CLI.

Symbols: for the per-image results of a job, the *certified accuracy* at radius r is the fraction of images whose
smoothed prediction is correct and certified with radius >= r. At r = 0 it is the *clean accuracy of the smoothed
classifier* (correct and not abstaining, prediction -1 never being correct).
"""

from __future__ import annotations

import math
from collections import abc
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

from dsq.errors import InvalidArgument

# The per-image columns every result row has: those of Cohen et al.'s certify log (exports.TSV_HEADER), in its
# order, so that a row converts to that log and back column for column.
RESULT_FIELDS = ("image_index", "label", "prediction", "radius", "correct", "seconds")
# The radii of Salman et al. (2020)'s CIFAR-10 table (experiments/cifar10.toml): r = 0 (the clean accuracy of the
# smoothed classifier), then steps of 0.25 up to 1.5.
DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
# The prediction an abstaining smoothed classifier stores: dsq.smoothing.ABSTAIN (Cohen et al.'s -1), repeated
# here because dsq.smoothing imports torch, which no module of dsq.report may.
ABSTAIN = -1

Rows = Iterable[Any]
Jobs = Sequence[tuple[str, Rows]]


@dataclass(frozen=True)
class Result:
    """One certified image, read from any row: ``correct`` already means ``prediction == label != -1``."""

    image_index: int
    label: int
    prediction: int
    radius: float
    correct: bool
    seconds: float


class JobCounts(NamedTuple):
    """One job's numbers: its images n, those correct (r = 0), and those certified correct per radius."""

    label: str
    n: int
    clean: int
    certified: list[int]


def field(row: Any, name: str, default: Any = ...) -> Any:
    """``row[name]`` for a mapping, ``row.name`` otherwise (ORM objects, SQLAlchemy ``Row``, dataclasses)."""
    if isinstance(row, abc.Mapping):  # collections.abc's: typing.Mapping's check costs ten times more
        value = row.get(name, default)
    else:
        value = getattr(row, name, default)
    if value is ...:
        raise InvalidArgument(f"result row {row!r} has no {name!r}: expected fields {', '.join(RESULT_FIELDS)}")
    return value


def as_result(row: Any) -> Result:
    """A :class:`Result` from a row; a stored ``correct`` is kept (an API job's label rule) but never for abstains.
    A :class:`Result` is returned as it is (tables convert the rows of a job several times)."""
    if type(row) is Result:
        return row
    prediction, label = int(field(row, "prediction")), int(field(row, "label"))
    stored = field(row, "correct", None)
    correct = (prediction == label if stored is None else bool(int(stored))) and prediction != ABSTAIN
    seconds = field(row, "seconds", None)
    return Result(
        image_index=int(field(row, "image_index")),
        label=label,
        prediction=prediction,
        radius=float(field(row, "radius")),
        correct=correct,
        seconds=0.0 if seconds is None else float(seconds),
    )


def as_results(rows: Rows) -> list[Result]:
    """All rows as :class:`Result`, ordered by image index."""
    return sorted((as_result(r) for r in rows), key=lambda r: r.image_index)


def certified_counts(rows: Rows, radii: Sequence[float]) -> tuple[int, list[int]]:
    """``(n, k per radius)``: the number of images, and of those with ``correct and radius >= r`` for each r."""
    results = as_results(rows)
    if not results:
        raise InvalidArgument("no certified images: certified accuracy needs at least one result row")
    return len(results), [sum(1 for x in results if x.correct and x.radius >= r) for r in radii]


def certified_accuracy(rows: Rows, radii: Sequence[float]) -> list[float]:
    """Fraction of rows with ``correct and radius >= r`` for each r in ``radii`` (Cohen et al.'s definition)."""
    n, counts = certified_counts(rows, radii)
    return [k / n for k in counts]


def clean_accuracy(rows: Rows) -> float:
    """Accuracy of the smoothed classifier: correct and not abstaining (certified accuracy at r = 0)."""
    return certified_accuracy(rows, [0.0])[0]


# The ACR's sum counts radii in whole steps of 1 / FIXED_POINT (about 1.5e-11): a sum of integers, the same to
# the last bit whatever adds them, in whatever order (Python, SQLite, PostgreSQL).
FIXED_POINT = 2 ** 36


def radius_sum(radii: Iterable[float]) -> float:
    """The sum of ``radii`` (each >= 0), each rounded down to a step of 1 / FIXED_POINT; inf if one is."""
    radii = list(radii)
    if math.inf in radii or any(math.isnan(r) for r in radii):
        return math.fsum(radii)
    return sum(math.floor(r * FIXED_POINT) for r in radii) / FIXED_POINT


class Tally(NamedTuple):
    """What a job's table line counts, without its rows: its images n, those correct (not abstaining), those it
    abstained on, the sum of the correct images' radii (the ACR's numerator, ``radius_sum``), the largest of them,
    its first and last image index, and at each of ``radii`` the correct images with radius >= r (``certified``).

    ``tally`` counts rows in Python; ``dsq.db.repo.result_tallies`` counts the same in SQL, without loading them, and
    adds ``steps``: how many correct images' radii fall in each step of a grid (a curve's points)."""

    n: int
    clean: int
    abstains: int
    radius_sum: float
    largest: float
    first: int
    last: int
    radii: tuple[float, ...]
    certified: tuple[int, ...]
    steps: tuple[int, ...] = ()  # from the database: correct images per step of its grid (repo.result_tallies)

    def at(self, radius: float) -> int:
        """Correct images certified at ``radius`` or more; only radii it was counted at."""
        try:
            return self.certified[self.radii.index(radius)]
        except ValueError:
            raise InvalidArgument(f"no count at radius {radius!r}: counted at {list(self.radii)}") from None


def tally(rows: Rows, radii: Sequence[float]) -> Tally:
    """The :class:`Tally` of ``rows`` at ``radii`` (the ACR's sum in image order)."""
    results = as_results(rows)
    if not results:
        raise InvalidArgument("no certified images: certified accuracy needs at least one result row")
    correct = [x.radius for x in results if x.correct]
    return Tally(len(results), len(correct), sum(1 for x in results if x.prediction == ABSTAIN), radius_sum(correct),
                 max(correct, default=0.0), results[0].image_index, results[-1].image_index, tuple(radii),
                 tuple(sum(1 for x in correct if x >= r) for r in radii))


def job_counts(jobs: Jobs, radii: Sequence[float]) -> list[JobCounts]:
    """The :class:`JobCounts` of each (label, rows) job; a job without rows is InvalidArgument naming it."""
    table = []
    for label, rows in jobs:
        try:
            n, (clean, *certified) = certified_counts(rows, [0.0, *radii])
        except InvalidArgument as e:
            raise InvalidArgument(f"job {label}: {e}") from None
        table.append(JobCounts(label, n, clean, certified))
    return table


def parse_radii(text: str) -> list[float]:
    """``"0.25,0.5,1"`` -> ``[0.25, 0.5, 1.0]``, sorted and without duplicates; garbage or r < 0 is InvalidArgument."""
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise InvalidArgument(f"no radii in {text!r}: expected comma-separated numbers >= 0, e.g. 0,0.25,0.5")
    radii = []
    for part in parts:
        try:
            r = float(part)
        except ValueError:
            raise InvalidArgument(f"radius {part!r} in {text!r} is not a number: expected e.g. 0,0.25,0.5") from None
        if not math.isfinite(r) or r < 0:
            raise InvalidArgument(f"radius {part!r} in {text!r} must be a finite number >= 0")
        radii.append(r)
    return sorted(set(radii))
