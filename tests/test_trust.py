"""Bad numbers, bad names and unwritable databases through the CLI: one line, exit 2, nothing written."""

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cli.main import app
from dsq.db import repo
from dsq.db.session import open_database, session_scope

TRAIN = ["submit", "train", "--dataset", "digits", "--target", "classifier", "--arch", "small_cnn",
         "--objective", "standard", "--sigma", "0", "--epochs", "1"]
CERTIFY = ["submit", "certify", "--dataset", "digits", "--classifier", "job:1", "--n0", "10", "--n", "100"]


def dsq(home, *args):
    return CliRunner().invoke(app, ["--db", f"sqlite:///{home / 'dsq.db'}", *map(str, args)],
                              env={"DSQ_HOME": str(home), "RAY_ADDRESS": "", "DSQ_WORKER_AUTOSTART": "0"})


def jobs_in(home) -> int:
    engine = open_database(f"sqlite:///{home / 'dsq.db'}")
    with session_scope(engine) as session:
        count = len(repo.list_jobs(session, limit=1000))
    engine.dispose()
    return count


def one_line_exit_2(out, expected: str) -> None:
    lines = out.stderr.strip().splitlines()
    assert out.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (out.exit_code, out.stderr)
    assert expected in lines[0] and "Traceback" not in out.output + out.stderr and "\x1b" not in out.stderr


@pytest.fixture
def home(tmp_path, opens_database):
    assert dsq(tmp_path, *TRAIN, "--name", "[red]f[/red]").exit_code == 0
    return tmp_path


@pytest.mark.parametrize("args, expected", [
    (["--sigma", "25"], "did you mean 25/255 = 0.098"),
    (["--sigma", "4.5"], "far above the [0, 1] pixel range"),
    (["--sigma", "0.25", "--name", "x" * 10_000], "is 10,000 characters long"),
    (["--sigma", "0.25", "--name", "red \x1b[31m"], "control character '\\x1b'"),
    (["--sigma", "0.25", "--name", "two\nlines"], "control character '\\n'"),
])
def test_numbers_and_names_no_one_can_mean_are_refused(home, args, expected):
    one_line_exit_2(dsq(home, *CERTIFY, *args), expected)
    assert jobs_in(home) == 1


def test_a_large_sigma_is_accepted_with_a_warning(home):
    out = dsq(home, *CERTIFY, "--sigma", "2")
    assert out.exit_code == 0 and "warning: sigma 2 is above 1" in out.stderr and "2/255" in out.stderr


def test_user_text_is_printed_literally(home):
    listing = dsq(home, "jobs")
    assert "[red]f[/red]" in listing.output  # rich markup in a name is shown, not interpreted
    assert "[red]f[/red]" in dsq(home, "status", 1).output


def test_version_and_show(home):
    assert dsq(home, "--version").output.startswith("dsq ")
    shown = dsq(home, "show", 1).output
    assert "job 1: train, queued" in shown and "  objective = 'standard'" in shown


@pytest.mark.e2e
def test_an_unwritable_database_is_one_line_and_exit_2(home):
    (home / "dsq.db").chmod(0o444)
    home.chmod(0o555)
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"]
    env = os.environ | {"DSQ_HOME": str(home), "RAY_ADDRESS": "", "DSQ_WORKER_AUTOSTART": "0"}
    try:
        for args in (["cancel", "1"], TRAIN):
            out = subprocess.run(drop + [sys.executable, "-m", "cli", *args], env=env, capture_output=True, text=True,
                                 timeout=120)
            lines = out.stderr.strip().splitlines()
            assert out.returncode == 2 and len(lines) == 1 and "cannot write to database" in lines[0], out.stderr
            assert str(home / "dsq.db") in lines[0]
    finally:
        home.chmod(0o755)
        (home / "dsq.db").chmod(0o644)
    assert jobs_in(home) == 1


def test_a_dataset_whose_classes_do_not_match_the_classifier_is_refused(home, tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for name in ("cat", "dog", "fox"):
            (tmp_path / "pets" / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8), (40, 80, 120)).save(tmp_path / "pets" / split / name / "a.png")
    out = dsq(home, "submit", "certify", "--dataset", f"folder:{tmp_path / 'pets'}", "--classifier", "job:1",
              "--sigma", "0.25", "--n0", "10", "--n", "100")
    one_line_exit_2(out, f"the classifier has 10 outputs but dataset folder:{tmp_path / 'pets'} has 3 classes")
    assert jobs_in(home) == 1


def test_results_of_an_unfinished_job_say_they_are_partial(home):
    engine = open_database(f"sqlite:///{home / 'dsq.db'}")
    with session_scope(engine) as session:
        job = repo.create_job(session, kind="certify", spec={"sigma": 0.25}, seed=0, total=30)
        for image in range(7):
            repo.upsert_result(session, job.id, image, label=1, prediction=1, radius=0.3, correct=True, p_lower=0.9,
                               counts_selection=[0, 10], counts_estimation=[1, 99], n0=10, n=100, alpha=0.001,
                               sigma=0.25, seconds=0.1)
        repo.request_cancel(session, job.id)
        repo.mark_finished(session, job.id, "cancelled")
    engine.dispose()
    out = dsq(home, "results", job.id)
    assert out.exit_code == 0 and "partial: 7 of 30 images, job cancelled" in out.stderr and "(partial)" in out.output
    csv = dsq(home, "results", job.id, "--format", "csv")
    assert "partial: 7 of 30" in csv.stderr and csv.stdout.count("\n") == 8  # the data itself stays clean
