"""`dsq results` and `dsq compare` never wrong: sequential jobs, radii, partial and unnamed jobs, small runs; and what
papers report (ACR, abstain rate, per class, bands on plots), in every format. A SQLite file and the CLI in-process.
"""

import csv
import io
import json
import math

import pytest
from typer.testing import CliRunner

from cli.main import app
from dsq import bounds, demo, experiments
from dsq.db import repo
from dsq.db.session import open_database, session_scope
from dsq.kinds.certify import CertifySpec

SPEC = {"sigma": 0.25, "n": 1000, "alpha": 0.001, "classifier": "f.pt", "dataset": "digits"}
# fixed n, 20 images: (label, prediction, radius); 17 correct (85%), one abstains
FIXED = [(i % 3, i % 3, 0.1 + 0.025 * i) for i in range(15)] + [(0, 0, 0.05), (1, 1, 0.05), (2, 1, 0.2), (1, -1, 0.0),
         (0, 2, 0.1)]
# sequential at r = 0.3, 20 images: 15 certified (75%), the others abstain (not certified at 0.3)
SEQUENTIAL = [(i % 2, i % 2, 0.31) for i in range(15)] + [(i % 2, -1, 0.0) for i in range(5)]
SMALL = [(i, i, 0.4) for i in range(4)]  # 4 images, all right: 100%
FORMATS = ("table", "markdown", "latex", "csv", "json")


def add_job(session, rows, *, spec=SPEC, name=None, total=None, status="succeeded", kind="certify", **fields):
    job = repo.create_job(session, kind=kind, spec=spec, seed=0, name=name,
                          total=len(rows) if total is None else total, **fields)
    for image, (label, prediction, radius) in enumerate(rows):
        repo.upsert_result(session, job.id, image, label=label, prediction=prediction, radius=radius,
                           correct=prediction == label, p_lower=0.9, counts_selection=[0, 10],
                           counts_estimation=[1, 99], n0=10, n=spec.get("n", 100), alpha=0.001,
                           sigma=spec["sigma"], seconds=0.1)
    repo.set_progress(session, job.id, len(rows))
    repo.mark_running(session, job.id, "here")
    repo.mark_finished(session, job.id, status)
    return job.id


def add_training(session, spec):
    job = repo.create_job(session, kind="train", spec=spec, seed=0)
    repo.mark_running(session, job.id, "here")
    repo.mark_finished(session, job.id, "succeeded")
    return job.id


@pytest.fixture(scope="module")
def home(tmp_path_factory, opens_database):
    home = tmp_path_factory.mktemp("reporting-home")
    engine = open_database(f"sqlite:///{home / 'dsq.db'}")
    ids = {}
    with session_scope(engine) as session:
        ids["fixed"] = add_job(session, FIXED, name="MSE s=0.25")
        ids["sequential"] = add_job(session, SEQUENTIAL, spec={**SPEC, "sigma": 0.5, "radius": 0.3},
                                    name="MSE s=0.5")
        ids["partial"] = add_job(session, FIXED[:1], name="cut", total=20, status="cancelled")
        f = add_training(session, {"target": "classifier", "objective": "standard", "sigma": 0.0})
        for sigma in (0.25, 0.5):
            stab = add_training(session, {"target": "denoiser", "objective": "stab_mse", "sigma": sigma,
                                          "classifier": f"job:{f}"})
            ids[f"unnamed {sigma}"] = add_job(session, FIXED, spec={**SPEC, "sigma": sigma, "denoiser": f"job:{stab}"})
        ids["small"] = add_job(session, SMALL, name="no denoiser s=0.25", experiment="tiny",
                               meta={"method": "no denoiser", "sigma": 0.25})
        plan = experiments.load(demo.PRESET)  # the demo's file, its radii stored with each certification
        for step in plan.steps:
            if isinstance(step.spec, CertifySpec):
                ids.setdefault("digits", add_job(session, FIXED, spec=step.spec.to_dict(), name=step.spec.name,
                                                 experiment="digits-x", meta=step.meta))
    engine.dispose()
    return home, ids


def dsq(home, *args):
    return CliRunner().invoke(app, ["--db", f"sqlite:///{home / 'dsq.db'}", *map(str, args)],
                              env={"DSQ_HOME": str(home), "RAY_ADDRESS": "", "COLUMNS": "250"})


def ok(home, *args):
    out = dsq(home, *args)
    assert out.exit_code == 0, (args, out.output)
    return out


def rows_of(text: str, format: str) -> dict[str, list]:
    """label -> the row's other cells, read back from each format."""
    if format == "json":
        return {row["label"]: row for row in json.loads(text)["rows"]}
    if format == "csv":
        return {row["label"]: row for row in csv.DictReader(io.StringIO(text))}
    if format == "markdown":  # the images column (compare's) left out, as in the other formats' cells read here
        lines = text.split("\n\n")[0].splitlines()
        keep = [i for i, name in enumerate(lines[0].strip("| ").split(" | ")) if i and name != "images"]
        return {line.split(" | ")[0][2:]: [line.strip("| ").split(" | ")[i] for i in keep] for line in lines[2:]}
    if format == "latex":
        lines = [line for line in text.splitlines() if line.endswith(r" \\") and "&" in line]
        keep = [i for i, name in enumerate(lines[0][:-3].split(" & ")) if i and name != "images"]
        return {line.split(" & ")[0]: [line[:-3].split(" & ")[i] for i in keep] for line in lines[1:]}
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines() if line.count("│") > 2]
    return {row[0]: row[1:] for row in cells}


def test_a_sequential_job_answers_only_at_its_radius_in_every_format(home, tmp_path):
    home, ids = home
    jobs = (ids["fixed"], ids["sequential"])
    label = "MSE s=0.5 (sequential, r = 0.3)"
    for format in FORMATS:
        out = ok(home, "compare", *jobs, "--radii", "0,0.3,0.5", "--envelope", "--format", format)
        rows = rows_of(out.stdout, format)
        if format == "json":
            assert [rows[label][f"r={r}"] for r in ("0", "0.3", "0.5")] == [None, 0.75, None]
            assert rows["envelope: MSE"]["r=0"] == 0.85  # the fixed-n job: the only one that answers r = 0
        elif format == "csv":
            assert [rows[label][f"r={r}"] for r in ("0", "0.3", "0.5")] == ["n/a", "0.75", "n/a"]
        else:
            cells = rows[label][1:] if format == "table" else rows[label]
            assert cells[:3] == ["—", "75.0", "—"], (format, cells)
            envelope = rows["envelope: MSE"][1:] if format == "table" else rows["envelope: MSE"]
            assert envelope[0] == "85.0 (85.0)" and envelope[1] == "75.0"
        notes = out.stdout + out.stderr
        assert "not answered" in notes and "only" in notes
    assert ok(home, "results", ids["sequential"], "--radii", "0.3", "--format", "markdown").stdout.count("75.0") == 1
    refused = dsq(home, "results", ids["sequential"], "--radii", "0,0.3")
    assert refused.exit_code == 2 and "--radii 0.3" in refused.stderr and len(refused.stderr.splitlines()) == 1
    plot = tmp_path / "seq.svg"
    ok(home, "compare", *jobs, "--plot", plot)
    assert 'id="sequential-0.3' in plot.read_text()  # a sequential job is a point, not a curve over every radius


def test_default_radii_stop_where_the_jobs_can_certify(home):
    home, ids = home
    cap = bounds.max_radius(SPEC["n"], SPEC["alpha"], SPEC["sigma"])
    for format, summary in (("markdown", ()), ("json", ("--summary",))):
        text = ok(home, "results", ids["fixed"], "--format", format, *summary).stdout
        radii = json.loads(text)["radii"] if format == "json" else [
            float(h.split("= ")[1]) for h in text.splitlines()[0].strip("| ").split(" | ") if h.startswith("r = ")]
        assert radii[0] == 0 and max(radii) <= cap and len(radii) >= 4, radii
        assert max(radii) + (radii[1] - radii[0]) > cap  # as far as it can go, in round steps
    capped = ok(home, "compare", ids["fixed"], "--radii", "0,0.5,1", "--format", "markdown").stdout
    assert rows_of(capped, "markdown")["MSE s=0.25"][2] == "0.0† (85.0)" and f"above {cap:.3g}" in capped
    digits = experiments.load(demo.PRESET).radii
    wanted = [f"r = {r:g}" for r in digits]
    experiment = " ".join(ok(home, "results", "--experiment", "digits-x").stdout.split())
    assert all(f"┃ {w} ┃" in experiment or f"┃ {w} " in experiment for w in wanted)
    one = ok(home, "results", ids["digits"], "--format", "json", "--summary").stdout
    assert json.loads(one)["radii"] == list(digits)


def test_a_partial_job_is_marked_in_every_format(home):
    home, ids = home
    for format in FORMATS:
        out = ok(home, "compare", ids["fixed"], ids["partial"], "--format", format)
        rows = rows_of(out.stdout, format)
        if format in ("csv", "json"):
            assert str(rows["cut"]["partial"]) == "True" and str(rows["MSE s=0.25"]["partial"]) == "False"
        else:
            assert "cut (partial)" in rows, (format, list(rows))
        assert "partial: 1 of 20 images, job cancelled" in out.stdout + out.stderr


def test_unnamed_jobs_are_named_from_their_spec_and_enveloped(home, tmp_path):
    home, ids = home
    plot = tmp_path / "unnamed.svg"
    out = ok(home, "compare", ids["unnamed 0.25"], ids["unnamed 0.5"], "--envelope", "--format", "markdown",
             "--plot", plot)
    assert set(rows_of(out.stdout, "markdown")) == {"STAB+MSE (white-box) σ=0.25", "STAB+MSE (white-box) σ=0.5",
                                                    "envelope: STAB+MSE (white-box)"}
    assert "STAB+MSE (white-box) envelope" in plot.read_text()
    assert "MSE s=0.25" in rows_of(ok(home, "compare", ids["fixed"], "--format", "markdown").stdout, "markdown")
    alone = ok(home, "compare", ids["fixed"], ids["unnamed 0.25"], "--envelope")
    assert "nothing to combine" in alone.stderr and "envelope" not in alone.stdout


def test_a_small_run_says_how_uncertain_its_percentages_are(home):
    home, ids = home
    z = 1.959963984540054  # the 97.5% normal quantile: a 95% Wilson interval's widest half-width is z / 2 sqrt(n + z^2)
    points = f"±{100 * z / (2 * math.sqrt(len(SMALL) + z * z)):.0f} points"
    for format in FORMATS:
        out = ok(home, "compare", ids["small"], "--format", format)
        notes = json.loads(out.stdout)["notes"] if format == "json" else (out.stdout + out.stderr).splitlines()
        assert any(points in note and "4 images (the fewest" in note for note in notes), (format, notes)
    assert points in ok(home, "results", ids["small"]).stdout
    assert points in ok(home, "results", "--experiment", "tiny").stdout
    assert points not in ok(home, "compare", ids["fixed"]).stdout.replace("±", "")  # 20 images: another width
    assert "checks the pipeline, not the numbers" in demo.QUICK_NOTE


def expected_acr(rows):
    return sum(radius for label, prediction, radius in rows if prediction == label) / len(rows)


def test_acr_abstain_rate_and_classes_in_every_format(home):
    home, ids = home
    acr, abstain = expected_acr(FIXED), sum(p == -1 for _, p, _ in FIXED) / len(FIXED)
    classes = {c: [row for row in FIXED if row[0] == c] for c in (0, 1, 2)}
    for command in (["results", ids["fixed"], "--summary"], ["compare", ids["fixed"]]):
        for format in FORMATS:
            out = ok(home, *command, "--radii", "0,0.25", "--by-class", "--format", format)
            rows = rows_of(out.stdout, format)
            whole, first = rows["MSE s=0.25"], rows["MSE s=0.25: class 0"]
            if format in ("csv", "json"):
                assert math.isclose(float(whole["acr"]), acr) and math.isclose(float(whole["abstain_rate"]), abstain)
                assert math.isclose(float(first["acr"]), expected_acr(classes[0]))
                assert str(first["class"]) == "0" and str(whole["r=0"]) == str(17 / 20)
            else:
                assert whole[-2:] == [f"{acr:.3f}", f"{100 * abstain:.1f}"], (format, whole)
                assert first[-2] == f"{expected_acr(classes[0]):.3f}"
            assert {f"MSE s=0.25: class {c}" for c in classes} <= set(rows)


def test_confidence_bands_on_plots(home, tmp_path):
    home, ids = home
    plain, banded = tmp_path / "plain.svg", tmp_path / "banded.svg"
    ok(home, "compare", ids["fixed"], ids["unnamed 0.5"], "--plot", plain)
    ok(home, "compare", ids["fixed"], ids["unnamed 0.5"], "--plot", banded, "--ci")
    assert "PolyCollection" not in plain.read_text() and banded.read_text().count("PolyCollection") >= 2
    experiment = tmp_path / "experiment.svg"
    ok(home, "results", "--experiment", "digits-x", "--plot", experiment, "--ci")
    assert "PolyCollection" in experiment.read_text()


@pytest.mark.parametrize("args, expected", [
    (["results", "{fixed}", "--summary", "--format", "tsv"], "print a table: --format table, markdown"),
    (["results", "{fixed}", "--by-class", "--format", "tsv"], "print a table: --format table, markdown"),
])
def test_bad_options_are_one_line_exit_2(home, args, expected):
    home, ids = home
    out = dsq(home, *[a.format(**ids) for a in args])
    lines = out.stderr.strip().splitlines()
    assert out.exit_code == 2 and len(lines) == 1 and expected in lines[0], out.stderr
