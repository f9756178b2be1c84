"""`dsq results --experiment NAME` shows what `dsq compare` shows, in every format: ACR and abstain rate, --by-class,
sequential jobs answering only at their radius, partial jobs marked. A SQLite file and the CLI in-process."""

import csv
import io
import json
import math
import re

import pytest

from dsq.db.session import open_database, session_scope
from tests.test_reporting import FIXED, FORMATS, SEQUENTIAL, SPEC, add_job, dsq, expected_acr, ok

RADII = [0.0, 0.25, 0.5]  # the experiment file's; the sequential target 0.3 joins them
SEQUENTIAL_SPEC = {**SPEC, "sigma": 0.5, "radius": 0.3}
ACR, ABSTAIN = expected_acr(FIXED), sum(p == -1 for _, p, _ in FIXED) / len(FIXED)


@pytest.fixture(scope="module")
def home(tmp_path_factory, opens_database):
    """Experiment "grid": MSE at sigma 0.25 (fixed n) and 0.5 (sequential at r = 0.3); Cohen at 0.25 and at 0.5
    cancelled after 5 of its 20 images; STAB at 0.5 only, sequential."""
    home = tmp_path_factory.mktemp("experiment-home")
    engine = open_database(f"sqlite:///{home / 'dsq.db'}")

    def add(session, name, method, sigma, rows, spec=SPEC, **fields):
        add_job(session, rows, spec={**spec, "sigma": sigma}, name=name, experiment="grid",
                meta={"method": method, "sigma": sigma, "radii": RADII}, **fields)

    with session_scope(engine) as session:
        add(session, "MSE s=0.25", "MSE", 0.25, FIXED)
        add(session, "MSE s=0.5", "MSE", 0.5, SEQUENTIAL, SEQUENTIAL_SPEC)
        add(session, "Cohen s=0.25", "Cohen", 0.25, FIXED)
        add(session, "Cohen s=0.5", "Cohen", 0.5, FIXED[:5], total=20, status="cancelled")
        add(session, "STAB s=0.5", "STAB", 0.5, SEQUENTIAL, SEQUENTIAL_SPEC)
    engine.dispose()
    return home


def key_of(title: str) -> str:
    """A table's key in CSV and JSON rows, from its title in the text formats."""
    found = re.search(r"sigma = ([\d.]+):", title)
    return f"sigma={found.group(1)}" if found else "envelope"


def tables_of(text: str, format: str) -> dict[str, dict[str, list | dict]]:
    """table key -> label -> the row's other cells (a dict in CSV and JSON), read back from each format."""
    found: dict[str, dict] = {}
    if format in ("csv", "json"):
        rows = json.loads(text)["rows"] if format == "json" else list(csv.DictReader(io.StringIO(text)))
        for row in rows:
            found.setdefault(row["table"], {})[row["label"]] = row
        return found
    key = None
    for line in text.splitlines():
        if format == "markdown" and line.startswith("**"):
            key = key_of(line)
        elif format == "markdown" and line.startswith("| ") and not line.startswith("| method |"):
            found.setdefault(key, {})[line.split(" | ")[0][2:]] = line.strip("| ").split(" | ")[1:]
        elif format == "latex" and line.startswith(r"\caption{"):
            key = key_of(line)
        elif format == "latex" and line.endswith(r" \\") and "&" in line and not line.startswith("method &"):
            cells = line[:-3].split(" & ")
            found.setdefault(key, {})[cells[0]] = cells[1:]
        elif format == "table" and "│" not in line and ("sigma = " in line or "envelope across" in line):
            key = key_of(line)
        elif format == "table" and line.count("│") > 2:
            cells = [c.strip() for c in line.split("│")[1:-1]]
            found.setdefault(key, {})[cells[0]] = cells[1:]
    return found


def numbers(row, format: str) -> list:
    """A row's radii (0, 0.25, 0.3, 0.5), ACR and abstain rate as its format writes them."""
    if format in ("csv", "json"):
        return [row[k] for k in ("r=0", "r=0.25", "r=0.3", "r=0.5", "acr", "abstain_rate")]
    return row


def test_experiment_tables_in_every_format_mark_sequential_and_partial_jobs(home):
    for format in FORMATS:
        out = ok(home, "results", "--experiment", "grid", "--by-sigma", "--format", format)
        found = tables_of(out.stdout, format)
        assert set(found) == {"sigma=0.25", "sigma=0.5", "envelope"}, (format, out.stdout)
        fixed = numbers(found["sigma=0.25"]["MSE"], format)
        sequential = numbers(found["sigma=0.5"]["MSE (sequential, r = 0.3)"], format)
        only_sequential = numbers(found["envelope"]["STAB (sequential, r = 0.3)"], format)
        if format == "json":
            assert fixed == [0.85, 0.45, 0.35, 0.0, pytest.approx(ACR), pytest.approx(ABSTAIN)]
            assert sequential == only_sequential == [None, None, 0.75, None, None, None]
            assert found["sigma=0.5"]["Cohen"]["partial"] is True and found["envelope"]["Cohen"]["partial"] is True
            assert found["sigma=0.25"]["Cohen"]["partial"] is False
        elif format == "csv":
            assert fixed[:4] == ["0.85", "0.45", "0.35", "0.0"] and math.isclose(float(fixed[4]), ACR)
            assert sequential == only_sequential == ["n/a", "n/a", "0.75", "n/a", "n/a", "n/a"]
            assert found["sigma=0.5"]["Cohen"]["partial"] == "True"
        else:
            assert fixed == ["85.0 (85.0)", "45.0 (85.0)", "35.0 (85.0)", "0.0 (85.0)", f"{ACR:.3f}",
                             f"{100 * ABSTAIN:.1f}"], (format, fixed)
            assert sequential == only_sequential == ["—", "—", "75.0", "—", "—", "—"], (format, sequential)
            # the envelope takes the sequential job where it answers, the fixed-n one elsewhere
            assert found["envelope"]["MSE"][:4] == ["85.0 (85.0)", "45.0 (85.0)", "75.0", "0.0 (85.0)"]
            assert "Cohen (partial)" in found["sigma=0.5"] and "Cohen (partial)" in found["envelope"]
        notes = out.stdout + out.stderr
        assert "not answered" in notes and "Cohen s=0.5: partial: 5 of 20 images, job cancelled" in notes, format
        assert "5 images (the fewest" in notes  # the small-run note of before, kept


def test_experiment_by_class_in_every_format(home):
    classes = {c: [row for row in FIXED if row[0] == c] for c in (0, 1, 2)}
    for format in FORMATS:
        out = ok(home, "results", "--experiment", "grid", "--by-sigma", "--by-class", "--format", format)
        found = tables_of(out.stdout, format)
        for key, label in (("sigma=0.25", "MSE"), ("envelope", "MSE"), ("envelope", "Cohen")):
            assert {f"{label}: class {c}" for c in classes} <= set(found[key]), (format, key, list(found[key]))
        first = found["sigma=0.25"]["MSE: class 0"]
        # class 0 of the sequential job: 8 of its 11 images certified at r = 0.3
        sequential = numbers(found["sigma=0.5"]["MSE (sequential, r = 0.3): class 0"], format)
        if format in ("csv", "json"):
            assert math.isclose(float(first["acr"]), expected_acr(classes[0])) and str(first["class"]) == "0"
            assert math.isclose(float(sequential[2]), 8 / 11)
        else:
            assert first[-2] == f"{expected_acr(classes[0]):.3f}", (format, first)
            assert sequential[:4] == ["—", "—", "72.7", "—"], (format, sequential)


def test_the_default_experiment_table_is_the_envelope_with_acr_and_abstain_rate(home):
    out = ok(home, "results", "--experiment", "grid", "--format", "markdown")
    found = tables_of(out.stdout, "markdown")
    assert set(found) == {"envelope"} and out.stdout.splitlines()[2].startswith("| method | r = 0 | r = 0.25 |")
    assert found["envelope"]["STAB (sequential, r = 0.3)"] == ["—", "—", "75.0", "—", "—", "—"]
    assert out.stdout.splitlines()[2].endswith("| ACR | abstain % |")
    table = ok(home, "results", "--experiment", "grid", "--ci")
    assert "envelope across sigma: best certified accuracy % [95% CI] (clean)" in " ".join(table.stdout.split())
    assert "ACR" in table.stdout and "abstain %" in table.stdout


def test_experiment_data_with_a_plot_stays_clean(home, tmp_path):
    plot = tmp_path / "grid.svg"
    out = ok(home, "results", "--experiment", "grid", "--format", "csv", "--plot", plot)
    assert "curves written to" in out.stderr and "curves written" not in out.stdout
    assert {row["table"] for row in csv.DictReader(io.StringIO(out.stdout))} == {"envelope"}
    assert 'id="sequential-0.3' in plot.read_text()  # a sequential job is a point, as dsq compare draws it


@pytest.mark.parametrize("args, expected", [
    (["--experiment", "grid", "--format", "tsv"], "--experiment prints tables"),
    (["--experiment", "grid", "--alpha", "0.01"], "--alpha re-certifies one certify-api job"),
    (["1", "--by-sigma"], "--by-sigma splits an experiment's table"),
])
def test_bad_experiment_options_are_one_line_exit_2(home, args, expected):
    out = dsq(home, "results", *args)
    lines = out.stderr.strip().splitlines()
    assert out.exit_code == 2 and len(lines) == 1 and expected in lines[0], out.output
