"""Tests of dsq.report on hand-made rows with known answers."""

import csv
import io
import json
from types import SimpleNamespace

import pytest
from PIL import Image
from rich.console import Console

from dsq.errors import InvalidArgument
from dsq.report import accuracy, envelopes, exports, intervals, plots, tables


def row(i, label, prediction, radius, seconds=1.5, **extra):
    return {"image_index": i, "label": label, "prediction": prediction, "radius": radius, "seconds": seconds, **extra}


# 10 images: 6 correct (radii 0.0, 0.1, 0.3, 0.5, 0.9, 1.6), 2 abstain, 2 wrong with large radii
ROWS = [
    row(0, 3, 3, 0.3),
    row(1, 7, -1, 0.0),
    row(2, 4, 4, 0.5),
    row(3, 7, 7, 0.9),
    row(4, 8, 1, 1.2),  # wrong, certified: never counts
    row(5, 4, -1, 0.0),
    row(6, 8, 8, 0.1),
    row(7, 6, 6, 1.6),
    row(8, 2, 5, 0.7),  # wrong
    row(9, 1, 1, 0.0),  # correct at radius exactly 0 (p_lower = 0.5): counts at r = 0 only
]


def test_certified_accuracy_known_answers():
    radii = [0.0, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0]
    assert accuracy.certified_accuracy(ROWS, radii) == [0.6, 0.5, 0.4, 0.3, 0.1, 0.1, 0.0]
    assert accuracy.clean_accuracy(ROWS) == 0.6


def test_abstain_and_stored_correct():
    # a stored correct flag is kept (API jobs), except that an abstain is never correct
    rows = [row(0, -1, -1, 0.0, correct=True), row(1, 2, 3, 0.4, correct=1), row(2, 2, 2, 0.4, correct=False)]
    assert accuracy.certified_accuracy(rows, [0.0]) == [pytest.approx(1 / 3)]
    assert [r.correct for r in accuracy.as_results(rows)] == [False, True, False]


def test_rows_as_objects_and_dicts_agree():
    objects = [SimpleNamespace(**r) for r in ROWS]
    assert accuracy.certified_accuracy(objects, accuracy.DEFAULT_RADII) == accuracy.certified_accuracy(
        ROWS, accuracy.DEFAULT_RADII
    )
    with pytest.raises(InvalidArgument, match="'radius'"):
        accuracy.certified_accuracy([{"image_index": 0, "label": 1, "prediction": 1}], [0.0])
    with pytest.raises(InvalidArgument, match="no certified images"):
        accuracy.certified_accuracy([], [0.0])


def test_parse_radii():
    assert accuracy.parse_radii("0.25, 0.5,1") == [0.25, 0.5, 1.0]
    assert accuracy.parse_radii("1,0,0.5,1") == [0.0, 0.5, 1.0]
    assert accuracy.DEFAULT_RADII == (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
    for bad in ["", "0.25,,0.5", "a,b", "0.5,-0.25", "nan", "inf", "0.25;0.5"]:
        with pytest.raises(InvalidArgument):
            accuracy.parse_radii(bad)


def test_envelope_picks_best_job_per_radius():
    small = [row(0, 1, 1, 0.3), row(1, 2, 2, 0.3), row(2, 3, 3, 0.1), row(3, 4, 4, 0.0)]  # sharp, accurate
    large = [row(0, 1, 1, 1.2), row(1, 2, -1, 0.0), row(2, 3, 9, 0.5), row(3, 4, 4, 0.8)]  # wide, less accurate
    env = envelopes.envelope([("sigma=0.12", small), ("sigma=0.50", large)], [0.0, 0.25, 0.5, 1.0])
    assert env.accuracy == [1.0, 0.5, 0.5, 0.25]
    assert env.best == ["sigma=0.12", "sigma=0.12", "sigma=0.50", "sigma=0.50"]  # tie at 0.25: first job
    assert env.clean == [1.0, 1.0, 0.5, 0.5]
    fractions, best, _ = env  # a plain tuple too
    assert fractions == env.accuracy
    cells = tables.envelope_row([("a", small), ("b", large)], [0.0, 1.0], decimals=0)
    assert cells == ["envelope", "100 (100)", "25 (50)"]
    with pytest.raises(InvalidArgument, match="job b"):
        envelopes.envelope([("a", small), ("b", [])], [0.0])


def test_compare_table_cells_and_render():
    jobs = [("mse", ROWS), ("stab", [row(0, 1, 1, 0.6), row(1, 2, 2, 0.2)])]
    header = tables.compare_header([0.0, 0.5])
    table = tables.compare_table(jobs, [0.0, 0.5])
    assert header == ["job", "r = 0", "r = 0.5"]
    assert table == [["mse", "60.0 (60.0)", "30.0 (60.0)"], ["stab", "100.0 (100.0)", "50.0 (100.0)"]]
    with_base = tables.compare_table(jobs, [0.5], clean={"mse": 0.75}, decimals=0)
    assert with_base == [["mse", "30 (75)"], ["stab", "50 (100)"]]
    console = Console(file=io.StringIO(), width=120)
    console.print(tables.render_table(header, table, title="digits"))
    text = console.file.getvalue()
    assert "digits" in text and "r = 0.5" in text and "30.0 (60.0)" in text


@pytest.mark.parametrize("name, printed", [
    ("[red]evil[/red]", "[red]evil[/red]"),
    ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
    ("two\nlines", "two\\nlines"),
])
def test_render_table_prints_job_names_and_titles_literally(name, printed):
    table = tables.compare_table([(name, ROWS)], [0.5])
    console = Console(file=io.StringIO(), width=120, force_terminal=True, color_system="truecolor")
    console.print(tables.render_table(tables.compare_header([0.5]), table, title=name))
    text = console.file.getvalue()
    assert text.count(printed) == 2  # the title and the row label, as typed
    assert "\x1b[31m" not in text and "two\nlines" not in text  # no colour from the name, no broken row


def test_tsv_is_cohen_certify_log_format():
    rows = [row(20, 7, -1, 0.0, seconds=15.6), row(0, 3, 3, 0.37812345, seconds=15.4), row(40, 4, 4, 0.0831234)]
    lines = exports.to_tsv(rows).splitlines()
    assert lines[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime"
    assert lines[1] == "0\t3\t3\t0.378\t1\t0:00:15.400000"
    assert lines[2] == "20\t7\t-1\t0.0\t0\t0:00:15.600000"
    assert lines[3] == "40\t4\t4\t0.0831\t1\t0:00:01.500000"
    assert len(lines) == 4 and exports.to_tsv(rows).endswith("\n")


def test_csv_round_trip_keeps_full_precision():
    rows = ROWS + [row(10, 0, 0, 0.123456789012345)]
    parsed = list(csv.DictReader(io.StringIO(exports.to_csv(rows))))
    assert list(parsed[0]) == list(accuracy.RESULT_FIELDS)
    assert [int(p["image_index"]) for p in parsed] == list(range(11))
    assert float(parsed[10]["radius"]) == 0.123456789012345
    assert accuracy.certified_accuracy(parsed, [0.0, 0.5]) == accuracy.certified_accuracy(rows, [0.0, 0.5])
    assert [p["correct"] for p in parsed[:3]] == ["1", "0", "1"]


def test_json_round_trip_and_extra_fields():
    rows = [row(1, 2, 2, 0.5, p_lower=0.9, counts=[0, 0, 100]), row(0, 1, -1, 0.0, p_lower=0.3, counts=[40, 60])]
    items = json.loads(exports.to_json(rows, extra_fields=("p_lower", "counts")))
    assert items[0] == {
        "image_index": 0, "label": 1, "prediction": -1, "radius": 0.0, "correct": False, "seconds": 1.5,
        "p_lower": 0.3, "counts": [40, 60],
    }
    assert accuracy.certified_accuracy(items, [0.0, 0.5]) == [0.5, 0.5]
    parsed = list(csv.DictReader(io.StringIO(exports.to_csv(rows, extra_fields=("counts",)))))
    assert json.loads(parsed[1]["counts"]) == [0, 0, 100]


def test_curve_is_exact_step_function():
    radii, fractions = envelopes.curve(ROWS, 2.0)
    assert radii == [0.0, 0.1, 0.3, 0.5, 0.9, 1.6, 2.0]
    assert fractions == [0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]


def test_plot_curves_writes_png(tmp_path):
    path = tmp_path / "curves.png"
    jobs = [("sigma=0.25", ROWS), ("sigma=0.50", [row(0, 1, 1, 1.1), row(1, 2, -1, 0.0)])]
    plots.plot_curves(jobs, str(path), title="digits")
    assert path.stat().st_size > 1000
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100
    plots.plot_curves(jobs[:1], str(tmp_path / "short.png"), max_radius=0.5)
    assert (tmp_path / "short.png").stat().st_size > 1000
    with pytest.raises(InvalidArgument, match="does not exist"):
        plots.plot_curves(jobs, str(tmp_path / "missing" / "x.png"))
    with pytest.raises(InvalidArgument, match="no certified images"):
        plots.plot_curves([("empty", [])], str(path))


def test_sequential_table_has_accuracy_at_the_target_and_cost_per_image():
    # a sequential job at r = 0.25: certified images carry radius >= 0.25 (rows 0, 2, 3, 7 correct; 4, 8 wrong)
    costs = [100, 10_000, 200, 100, 300, 10_000, 10_000, 100, 400, 10_000]
    [cells] = tables.sequential_table([("seq", ROWS, costs)], 0.25)
    assert cells == ["seq", "0.25", "40.0", "4,120", "350", "10"]
    assert tables.sequential_header("queries")[3:5] == ["mean queries/image", "median queries/image"]
    assert tables.cost_summary([3, 1, 2]) == (2.0, 2.0) and tables.cost_summary([4, 1, 2, 3]) == (2.5, 2.5)
    assert "answers only 'certified within radius >= 0.25, or not'" in tables.sequential_note(0.25)
    with pytest.raises(InvalidArgument, match="no certified images"):
        tables.cost_summary([])


def test_clopper_pearson_known_values():
    assert intervals.clopper_pearson(0, 10) == (0.0, pytest.approx(1 - 0.025 ** 0.1))  # 0.3085
    assert intervals.clopper_pearson(10, 10) == (pytest.approx(0.025 ** 0.1), 1.0)
    assert intervals.clopper_pearson(5, 10) == (pytest.approx(0.18709, abs=1e-5), pytest.approx(0.81291, abs=1e-5))
    assert intervals.clopper_pearson(5, 10, 0.1) == (pytest.approx(0.22244, abs=1e-5), pytest.approx(0.77756, abs=1e-5))
    for k, n, alpha in [(11, 10, 0.05), (0, 0, 0.05), (1, 10, 0.0), (1, 10, 1.0), (1, 10, float("nan"))]:
        with pytest.raises(InvalidArgument):
            intervals.clopper_pearson(k, n, alpha)
    # 6 of 10 correct at r = 0 and 3 at r = 0.5: each cell carries its interval, in percent
    assert tables.compare_table([("mse", ROWS)], [0.0, 0.5], ci=0.05) == [
        ["mse", "60.0 [26.2, 87.8] (60.0)", "30.0 [6.7, 65.2] (60.0)"]]
    assert tables.accuracy_title(0.1) == "certified accuracy % [90% CI] (clean)"


@pytest.mark.parametrize("name, method, sigma", [
    ("MSE s=0.25", "MSE", 0.25), ("cifar_sigma0.5 (bf16)", "cifar (bf16)", 0.5), ("mse (σ=1)", "mse", 1.0),
    ("stab@0.25", "stab", 0.25), ("cohen SIGMA 0.5 run2", "cohen run2", 0.5), ("job 3", "job 3", None),
    ("x (sequential, r = 0.2)", "x (sequential, r = 0.2)", None), ("abs=0.3", "abs=0.3", None),
])
def test_split_sigma_finds_the_method_of_a_job_name(name, method, sigma):
    assert envelopes.split_sigma(name) == (method, sigma)


def test_envelope_curve_is_the_best_job_at_every_radius():
    sharp = [row(0, 1, 1, 0.3), row(1, 2, 2, 0.3), row(2, 3, 3, 0.1)]
    wide = [row(0, 1, 1, 1.2), row(1, 2, -1, 0.0), row(2, 3, 9, 0.5)]
    assert envelopes.envelope_curve([sharp, wide], 2.0) == ([0.0, 0.1, 0.3, 1.2, 2.0], [1.0, 1.0, 2 / 3, 1 / 3, 0.0])
    assert envelopes.envelope_curve([ROWS], 2.0) == envelopes.curve(ROWS, 2.0)


def test_plot_format_follows_the_extension(tmp_path):
    assert [plots.plot_format(tmp_path / name) for name in ("a.png", "b.PDF", "c.svg")] == ["png", "pdf", "svg"]
    for name in ("a.jpg", "a", "a.png.txt"):
        with pytest.raises(InvalidArgument, match="must end in .png, .pdf or .svg"):
            plots.plot_curves([("a", ROWS)], str(tmp_path / name))
    assert not list(tmp_path.iterdir())


def test_jobs_that_share_a_cap_share_one_note_line():
    from dsq.report import summary

    rows = [SimpleNamespace(label=0, prediction=0, radius=0.3, correct=True)]
    jobs = [summary.Job("MSE s=0.25", rows, cap=0.616), summary.Job("STAB s=0.25", rows, cap=0.616),
            summary.Job("MSE s=0.5", rows, cap=1.23), summary.Job("MSE s=1", rows, cap=2.46)]
    capped = [line for line in summary.notes(jobs, [0.5, 1.0, 2.0], []) if line.startswith(summary.CAPPED)]
    assert capped == [
        "† MSE s=0.25, STAB s=0.25: no radius above 0.616 can be certified at their sigma, n and alpha, so their "
        "cells beyond are 0 by construction",
        "† MSE s=0.5: no radius above 1.23 can be certified at its sigma, n and alpha, so its cells beyond are 0 by "
        "construction"]
