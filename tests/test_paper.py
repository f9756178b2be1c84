"""`dsq compare` and `dsq results` as a paper needs them: envelopes per method, intervals, plots.

A real SQLite database and the real CLI (in-process); no Ray, no torch.
"""

import pytest
from typer.testing import CliRunner

from cli.main import app
from dsq.db import repo
from dsq.db.session import open_database, session_scope

# (name, sigma, images, [radius of each correct image]); the other images are wrong
JOBS = [
    ("MSE s=0.25", 0.25, 10, [0.3] * 6),    # 60 60 0 at r = 0, 0.25, 0.5
    ("MSE s=0.5", 0.5, 10, [0.6] * 4),      # 40 40 40
    ("Cohen s=0.25", 0.25, 10, [0.4] * 8),  # 80 80 0
    ("Cohen s=0.5", 0.5, 6, [0.7] * 3),     # 50 50 50, on 6 of the 10 images
]


@pytest.fixture(scope="module")
def home(tmp_path_factory, opens_database):
    """Jobs 1-4 of JOBS, succeeded, in experiment "paper" (methods MSE and Cohen)."""
    home = tmp_path_factory.mktemp("paper-home")
    engine = open_database(f"sqlite:///{home / 'dsq.db'}")
    with session_scope(engine) as session:
        for name, sigma, images, radii in JOBS:
            job = repo.create_job(session, kind="certify", spec={"sigma": sigma}, seed=0, name=name, total=images,
                                  experiment="paper", meta={"method": name.split()[0], "sigma": sigma})
            for image in range(images):
                correct = image < len(radii)
                repo.upsert_result(session, job.id, image, label=1, prediction=1 if correct else 2,
                                   radius=radii[image] if correct else 0.1, correct=correct, p_lower=0.9,
                                   counts_selection=[0, 10], counts_estimation=[1, 99], n0=10, n=100,
                                   alpha=0.001, sigma=sigma, seconds=0.1)
            repo.set_progress(session, job.id, images)
            repo.mark_running(session, job.id, "here")
            repo.mark_finished(session, job.id, "succeeded")
    engine.dispose()
    return home


def dsq(home, *args):
    return CliRunner().invoke(app, ["--db", f"sqlite:///{home / 'dsq.db'}", *map(str, args)],
                              env={"DSQ_HOME": str(home), "RAY_ADDRESS": "", "COLUMNS": "200"})


def markdown_rows(output):
    """label -> its certified accuracy cells (the ACR and abstain columns and the notes below the table left out)."""
    lines = output.split("\n\n")[0].splitlines()
    header = lines[0].strip("| ").split(" | ")
    radii = [i for i, name in enumerate(header) if name.startswith("r = ")]
    return {line.split(" | ")[0][2:]: [line.strip("| ").split(" | ")[i] for i in radii] for line in lines[2:]}


def markdown_images(output: str) -> dict[str, str]:
    """label -> its images column, in a markdown table that has one."""
    lines = output.split("\n\n")[0].splitlines()
    column = lines[0].strip("| ").split(" | ").index("images")
    return {line.split(" | ")[0][2:]: line.strip("| ").split(" | ")[column] for line in lines[2:]}


def test_envelope_is_per_method_and_warns_of_different_images(home):
    out = dsq(home, "compare", 1, 2, 3, 4, "--envelope", "--radii", "0,0.25,0.5", "--format", "markdown")
    assert out.exit_code == 0, out.output
    rows = markdown_rows(out.stdout)
    assert rows["envelope: MSE"] == ["60.0 (60.0)", "60.0 (60.0)", "40.0 (40.0)"]
    assert rows["envelope: Cohen"] == ["80.0 (80.0)", "80.0 (80.0)", "50.0 (50.0)"]
    assert rows["Cohen s=0.5"] == ["50.0 (50.0)", "50.0 (50.0)", "50.0 (50.0)"] and len(rows) == 6
    assert markdown_images(out.stdout) == {"MSE s=0.25": "10", "MSE s=0.5": "10", "Cohen s=0.25": "10",
                                           "Cohen s=0.5": "6", "envelope: MSE": "10", "envelope: Cohen": "6-10"}
    latex = dsq(home, "compare", 1, 4, "--radii", "0.5", "--format", "latex").stdout
    assert "job & images & r = 0.5" in latex, latex
    assert out.stderr.strip() == ("warning: jobs certified different images: job 1 has 10, job 2 has 10, "
                                  "job 3 has 10, job 4 has 6 (6 in common)")
    table = dsq(home, "compare", 1, 2, 3, 4, "--envelope", "--radii", "0.5")
    images = {cells[1].strip(): cells[2].strip() for cells in (line.split("│") for line in table.stdout.splitlines())
              if len(cells) > 2}
    assert table.exit_code == 0 and "┃ images ┃" in table.stdout
    assert images == {"MSE s=0.25": "10", "MSE s=0.5": "10", "Cohen s=0.25": "10", "Cohen s=0.5": "6",
                      "envelope: MSE": "10", "envelope: Cohen": "6-10"}
    same = dsq(home, "compare", 1, 2, "--envelope")
    assert same.exit_code == 0 and same.stderr == "" and "envelope: MSE" in same.stdout
    alone = dsq(home, "compare", 1, 3, "--envelope", "--format", "markdown")  # one job per method: no envelope
    assert alone.exit_code == 0 and "envelope" not in alone.stdout


def test_confidence_intervals_on_every_table(home):
    out = dsq(home, "results", 1, "--radii", "0,0.5", "--ci", "--format", "markdown")
    assert out.exit_code == 0, out.output
    assert markdown_rows(out.stdout)["MSE s=0.25"] == ["60.0 [26.2, 87.8] (60.0)", "0.0 [0.0, 30.8] (60.0)"]
    ninety = dsq(home, "compare", 4, 2, "--radii", "0.5", "--ci-alpha", "0.1", "--envelope", "--format", "markdown")
    rows = markdown_rows(ninety.stdout)
    assert rows["Cohen s=0.5"] == ["50.0 [15.3, 84.7] (50.0)"] and rows["MSE s=0.5"] == ["40.0 [15.0, 69.6] (40.0)"]
    latex = dsq(home, "compare", 1, 2, "--radii", "0.25", "--ci", "--envelope", "--format", "latex").stdout
    assert "60.0 [26.2, 87.8] (60.0)" in latex and r"certified accuracy \% [95\% CI] (clean)" in latex
    table = dsq(home, "results", 1, "--radii", "0.25", "--ci").stdout
    assert "certified accuracy % [95% CI] (clean), 10 images" in " ".join(table.split())
    assert "60.0 [26.2, 87.8] (60.0)" in table
    experiment = dsq(home, "results", "--experiment", "paper", "--radii", "0.5", "--ci", "--by-sigma")
    assert experiment.exit_code == 0 and "40.0 [12.2, 73.8] (40.0)" in experiment.stdout
    assert "best certified accuracy % [95% CI] (clean)" in " ".join(experiment.stdout.split())  # a wrapped title


@pytest.mark.parametrize("suffix, magic", [("png", b"\x89PNG\r\n\x1a\n"), ("pdf", b"%PDF-"), ("svg", b"<?xml")])
def test_plots_in_the_format_of_their_name(home, tmp_path, suffix, magic):
    path = tmp_path / f"curves.{suffix.upper() if suffix == 'pdf' else suffix}"
    out = dsq(home, "compare", 1, 2, 3, 4, "--envelope", "--plot", path, "--title", "Table 1 [digits]")
    assert out.exit_code == 0, out.output
    assert path.read_bytes().startswith(magic) and path.stat().st_size > 1000
    if suffix == "svg":
        text = path.read_text()
        for text_shown in ("MSE σ=0.25", "MSE σ=0.5", "Cohen σ=0.25", "MSE envelope", "Cohen envelope",
                           "Table 1 [digits]"):
            assert text_shown in text, text_shown
        assert "stroke-dasharray" in text  # the second sigma's line style


def test_experiment_plot_and_title(home, tmp_path):
    path = tmp_path / "experiment.svg"
    out = dsq(home, "results", "--experiment", "paper", "--plot", path, "--title", "digits, sigma grid")
    assert out.exit_code == 0, out.output
    text = path.read_text()
    assert "digits, sigma grid" in text and "Cohen σ=0.5" in text and "Cohen envelope" in text


@pytest.mark.parametrize("args, expected", [
    (["compare", 999, "--plot", "curves.jpg"], "must end in .png, .pdf or .svg"),  # refused before the job is read
    (["results", "--experiment", "nope", "--plot", "curves"], "must end in .png, .pdf or .svg"),
    (["compare", 1, "--plot", "/no/such/folder/curves.png"], "does not exist"),
    (["compare", 1, "--title", "x"], "--plot"),
    (["results", 1, "--plot", "curves.png"], "dsq compare"),
    (["compare", 1, "--ci-alpha", "1.5"], "alpha must be between 0 and 1"),
    (["results", 1, "--ci-alpha", "0"], "alpha must be between 0 and 1"),
    (["results", 1, "--ci", "--format", "csv"], "--ci applies to the tables"),
])
def test_bad_options_are_one_line_exit_2(home, tmp_path, args, expected):
    out = dsq(home, *[tmp_path / a if str(a).startswith("curves") else a for a in args])
    lines = out.stderr.strip().splitlines()
    assert out.exit_code == 2 and len(lines) == 1 and expected in lines[0], out.stderr
    assert not list(tmp_path.iterdir())
