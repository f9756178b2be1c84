"""Bad numbers, bad names and unwritable databases through the CLI: one line, exit 2, nothing written."""

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cli.main import app
from dsq.db import repo
from dsq.db.session import open_database, session_scope
from tests.conftest import NARROW

TRAIN = ["submit", "train", "--dataset", "digits", "--target", "classifier", *NARROW,
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


DROP_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                 "--inh-caps=-dac_override,-dac_read_search"]  # root then obeys file modes


def dsq_without_override(home, *args):
    env = os.environ | {"DSQ_HOME": str(home), "RAY_ADDRESS": "", "DSQ_WORKER_AUTOSTART": "0"}
    return subprocess.run(DROP_OVERRIDE + [sys.executable, "-m", "cli", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=180)


def wal_files(home) -> list[str]:
    return sorted(path.name for path in home.glob("dsq.db-*"))


@pytest.fixture
def closed_home(tmp_path):
    """A database with one job, written by another process that has closed it (no -wal or -shm file left)."""
    assert dsq_without_override(tmp_path, *TRAIN).returncode == 0
    assert wal_files(tmp_path) == []
    return tmp_path


@pytest.mark.e2e
def test_a_read_only_database_file_refuses_writes_in_one_line_and_is_usable_once_fixed(closed_home):
    """dsq.db chmod 444 in a writable folder: the writing commands (the worker included) say one line and exit 2,
    leaving no -wal or -shm file behind (SQLite would create them read-only, breaking writes after the fix); the
    reading commands still read it; once dsq.db is writable again, writes work."""
    (closed_home / "dsq.db").chmod(0o444)
    try:
        for args in (["worker", "--drain"], ["cancel", "1"], TRAIN):
            out = dsq_without_override(closed_home, *args)
            lines = out.stderr.strip().splitlines()
            assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stdout + out.stderr, out.stderr
            assert lines[0] == (f"error: cannot write to database sqlite:///{closed_home / 'dsq.db'}: "
                                f"not writable by this user: {closed_home / 'dsq.db'}")
            assert wal_files(closed_home) == [], args
        for args in (["jobs"], ["status", "1"], ["show", "1"], ["logs", "1"]):
            out = dsq_without_override(closed_home, *args)
            assert out.returncode == 0 and out.stderr == "" and "train" in out.stdout + out.stderr, (args, out.stderr)
            assert wal_files(closed_home) == [], args
    finally:
        (closed_home / "dsq.db").chmod(0o644)
    assert jobs_in(closed_home) == 1
    out = dsq_without_override(closed_home, *TRAIN)
    assert out.returncode == 0 and out.stdout.strip() == "job 2", out.stderr
    assert dsq_without_override(closed_home, "cancel", "2").returncode == 0


@pytest.mark.e2e
def test_a_read_only_shm_file_left_behind_is_named(closed_home):
    """-wal and -shm files that an earlier read-only open left read-only: writes are refused naming them; reads
    work; once they are writable, writes work."""
    (closed_home / "dsq.db-shm").touch(0o444)
    (closed_home / "dsq.db-wal").touch(0o444)
    out = dsq_without_override(closed_home, "cancel", "1")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].endswith(f"not writable by this user: {closed_home / 'dsq.db-wal'}, {closed_home / 'dsq.db-shm'}")
    assert dsq_without_override(closed_home, "jobs").returncode == 0
    (closed_home / "dsq.db-shm").chmod(0o644)
    (closed_home / "dsq.db-wal").chmod(0o644)
    assert dsq_without_override(closed_home, "cancel", "1").returncode == 0


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
