"""The database counts a results table as the rows would (``repo.result_tallies`` against ``accuracy.tally``): ties
at a table radius and a step's edge, radii one ulp either side, abstains (one stored as correct), wrong predictions
with large radii, an infinite radius, L∞ scaling; the sum of the radii to the last bit; and the table built from
either is the same, intervals included. On SQLite and PostgreSQL."""

import math
import random

from sqlalchemy import insert

from dsq import views
from dsq.dashboard import curves
from dsq.db import repo
from dsq.db.models import Result
from dsq.db.session import session_scope
from dsq.report import accuracy, summary

RADII = [0.0, 0.25, 0.5, 0.75, 1.0, 2.5]


def rows_of(seed: int, images: int) -> list[dict]:
    rng = random.Random(seed)
    edge = views.curve_end([1.0]) / views.CURVE_POINTS * 37  # a step's edge of the curve grid, if 1.0 is largest
    tricky = [0.0, 0.25, 0.5, 1.0, edge, math.nextafter(0.25, 0), math.nextafter(0.5, 1), math.nextafter(1.0, 0)]
    found = []
    for index in range(images):
        label, draw = index % 10, rng.random()
        prediction = label if draw < 0.7 else -1 if draw < 0.85 else (label + 1) % 10
        radius = tricky[index] if index < len(tricky) else rng.choice([rng.uniform(0, 1.0), rng.choice(tricky)])
        correct = prediction == label
        if prediction == -1:
            radius, correct = 0.0, index % 7 == 0  # an abstain stored as correct never counts
        found.append(dict(image_index=3 * index + seed, label=label, prediction=prediction, radius=radius,
                          correct=correct, seconds=0.5))
    return found


def store(session, rows: list[dict]) -> int:
    job = repo.create_job(session, kind="certify", spec={"sigma": 0.25, "n": 1000, "alpha": 0.001,
                                                          "dataset": "cifar10"}, seed=0, total=len(rows))
    session.execute(insert(Result), [dict(row, job_id=job.id, p_lower=0.9, counts_selection=[1],
                                          counts_estimation=[1], n0=1, n=1000, alpha=0.001, sigma=0.25)
                                     for row in rows])
    return job.id


def test_database_tallies_equal_the_rows_counted_in_python(engine):
    data = {seed: rows_of(seed, 400) for seed in (1, 2)}
    infinite = next(row for row in data[2][10:] if row["correct"] and row["prediction"] != -1)
    infinite["radius"] = math.inf  # correct: counted at every radius
    with session_scope(engine) as session:
        ids = {seed: store(session, rows) for seed, rows in data.items()}
    for scale in (None, 1 / math.sqrt(3 * 32 * 32)):
        radii = RADII if scale is None else [r * scale for r in RADII]
        with session_scope(engine) as session:
            counted = repo.result_tallies(session, ids.values(), radii, scale, per_unit=200 / 1.05)
        for seed, rows in data.items():
            scaled = [dict(row, radius=row["radius"] * (scale or 1.0)) for row in rows]
            python, sql = accuracy.tally(scaled, radii), counted[ids[seed]]
            assert sql._replace(steps=()) == python  # the radius sum too, to the last bit
            assert sum(sql.steps) == python.clean
        assert counted[ids[1]].radius_sum < math.inf == counted[ids[2]].radius_sum


def test_a_table_from_the_database_is_the_table_from_the_rows(engine):
    rows = rows_of(3, 300)
    with session_scope(engine) as session:
        job_id = store(session, rows)
        [from_rows] = views.report_jobs(session, [job_id])
        [counted] = views.tallied(session, views.report_jobs(session, [job_id], rows=False), RADII)
    assert counted.rows is None and counted.partial == from_rows.partial
    for ci in (None, 0.05):
        expected, found = (summary.records(summary.build([job], RADII, ci=ci)) for job in (from_rows, counted))
        assert found == expected


def test_a_curve_from_the_steps_counts_as_the_rows(engine):
    rows = rows_of(4, 300)
    correct = [row for row in rows if row["correct"] and row["prediction"] != -1]
    end = views.curve_end([max(row["radius"] for row in correct)])
    xs = curves.grid(end, RADII)
    correct[-1]["radius"], correct[-2]["radius"] = xs[40], math.nextafter(xs[41], 0)  # a step's edge, an ulp below
    with session_scope(engine) as session:
        job_id = store(session, rows)
        [job] = views.tallied(session, views.report_jobs(session, [job_id], rows=False), RADII)
    assert curves.axis_end([job]) == end
    radii = [row["radius"] for row in correct]
    assert curves.certified(job, xs, end) == [sum(r >= x for r in radii) for x in xs]
