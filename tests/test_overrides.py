"""`dsq submit experiment FILE --set KEY=VALUE`: a smoke run of any experiment, recorded with every job."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cli.main import app
from dsq.db import repo
from dsq.db.session import open_database, session_scope

pytestmark = pytest.mark.db  # submits through the CLI into a SQLite file
PLAN = ('name = "t"\ndataset = "digits"\nsigmas = [0.25]\n'
        '[models.f]\ntarget = "classifier"\narch = "small_cnn"\nobjective = "standard"\nepochs = 5\n'
        '[certify]\nn0 = 10\nn = 1000\n'
        '[[methods]]\nlabel = "plain"\nclassifier = "f"\nmax_images = 100\n')


def dsq(tmp_path, *args):
    (tmp_path / "plan.toml").write_text(PLAN)
    return CliRunner().invoke(app, ["--db", f"sqlite:///{tmp_path / 'dsq.db'}", "submit", "experiment",
                                    str(tmp_path / "plan.toml"), *args],
                              env={"DSQ_HOME": str(tmp_path), "DSQ_WORKER_AUTOSTART": "0", "RAY_ADDRESS": ""})


def jobs_in(tmp_path):
    if not (tmp_path / "dsq.db").exists():
        return []
    engine = open_database(f"sqlite:///{tmp_path / 'dsq.db'}")
    with session_scope(engine) as session:
        found = sorted(repo.list_jobs(session, limit=None), key=lambda job: job.id)
    engine.dispose()
    return found


def test_set_changes_the_plan_for_this_run_and_every_job_records_it(tmp_path):
    out = dsq(tmp_path, "--set", "max_images=2", "--set", "n=200", "--set", "models.f.epochs=1")
    assert out.exit_code == 0, out.output
    assert "changed by --set: max_images=2, n=200, models.f.epochs=1" in out.output
    train, certify = jobs_in(tmp_path)
    assert train.spec["epochs"] == 1 and certify.spec["n"] == 200 and certify.spec["max_images"] == 2
    assert certify.spec["n0"] == 10  # what --set does not name stays as the file says
    overrides = {"max_images": 2, "n": 200, "models.f.epochs": 1}
    assert train.meta["overrides"] == overrides and certify.meta["overrides"] == overrides
    shown = CliRunner().invoke(app, ["--db", f"sqlite:///{tmp_path / 'dsq.db'}", "show", str(certify.id)]).output
    assert "changed by --set: max_images=2, n=200, models.f.epochs=1" in shown


@pytest.mark.parametrize("args, expected", [
    (["--set", "max_imagez=2"], "--set max_imagez: unknown key 'max_imagez'; did you mean 'max_images'?"),
    (["--set", "n=abc"], "n must be an integer"),
    (["--set", "n=0"], "n must be an integer >= 1"),
    (["--set", "models.g.epochs=1"], "--set models.g.epochs: unknown key"),
    (["--set", "certify.epochs=1"], "--set certify.epochs: unknown key 'epochs'"),
    (["--set", "n"], "--set 'n': expected KEY=VALUE"),
])
def test_a_bad_set_is_one_line_exit_2_and_nothing_is_written(tmp_path, args, expected):
    out = dsq(tmp_path, *args)
    assert out.exit_code == 2 and expected in out.stderr, out.output
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.output and "#1 " not in out.output
    assert jobs_in(tmp_path) == []
