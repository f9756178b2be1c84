"""Experiment files that used to slip through: bad radii, typos in references, repeated sigmas, huge plans,
missing data on a dry run, the same experiment submitted twice. Each is one line naming the file and key."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from dsq.db import repo
from dsq.db.session import open_database, session_scope

pytestmark = pytest.mark.db  # each submits through the CLI into a SQLite file
PRESETS = Path(__file__).resolve().parents[1] / "experiments"
PLAN = ('name = "t"\ndataset = "digits"\nsigmas = [0.25]\n'
        '[models.f]\ntarget = "classifier"\narch = "small_cnn"\nobjective = "standard"\nepochs = 1\n'
        '[models.mse]\narch = "dncnn"\nobjective = "mse"\nepochs = 1\n'
        '[certify]\nn0 = 10\nn = 100\nmax_images = 2\n'
        '[[methods]]\nlabel = "MSE"\nclassifier = "f"\ndenoiser = "mse"\n')


def dsq(tmp_path, *args):
    return CliRunner().invoke(app, ["--db", f"sqlite:///{tmp_path / 'dsq.db'}", *args],
                              env={"DSQ_HOME": str(tmp_path), "DSQ_WORKER_AUTOSTART": "0", "DSQ_DATA": None})


def refused(tmp_path, text: str, *options: str) -> str:
    path = tmp_path / "plan.toml"
    path.write_text(text)
    result = dsq(tmp_path, "submit", "experiment", str(path), *options)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "#1 " not in result.output  # refused before the plan is printed
    assert not (tmp_path / "dsq.db").exists() or not jobs_in(tmp_path)
    return result.output.strip()


def jobs_in(tmp_path):
    engine = open_database(f"sqlite:///{tmp_path / 'dsq.db'}")
    with session_scope(engine) as session:
        found = repo.list_jobs(session, limit=None)
    engine.dispose()
    return found


@pytest.mark.parametrize("radii", ['["a", nan]', "[nan]", "[-0.5, 0.25]", "[]", "[0.25, 0.25]", '"0.5"'])
def test_bad_radii_are_refused(tmp_path, radii):
    line = refused(tmp_path, PLAN.replace('sigmas = [0.25]\n', f"sigmas = [0.25]\nradii = {radii}\n"))
    assert line.startswith(f"error: {tmp_path / 'plan.toml'}: radii")


def test_a_mistyped_model_reference_names_the_file_the_key_and_the_likely_model(tmp_path):
    line = refused(tmp_path, PLAN.replace('denoiser = "mse"', 'denoiser = "msee"'))
    assert "plan.toml: [[methods]] 'MSE': denoiser 'msee' is not a model of this file" in line
    assert "did you mean 'mse'?" in line


def test_a_repeated_sigma_is_named(tmp_path):
    line = refused(tmp_path, PLAN.replace("sigmas = [0.25]", "sigmas = [0.25, 0.5, 0.25]"))
    assert "sigmas: 0.25 is listed twice" in line


def test_a_huge_plan_is_refused_unless_allowed(tmp_path):
    sigmas = ", ".join(f"0.{i:03d}" for i in range(1, 600))
    huge = PLAN.replace("sigmas = [0.25]", f"sigmas = [{sigmas}]")
    line = refused(tmp_path, huge)
    assert "the plan has up to 1,797 jobs" in line and "--max-jobs 1797" in line
    assert "error" not in dsq(tmp_path, "submit", "experiment", str(tmp_path / "plan.toml"), "--dry-run",
                              "--max-jobs", "1797").output
    (tmp_path / "big.toml").write_bytes(b"# " + b"x" * (1 << 20) + b"\n" + PLAN.encode())
    result = dsq(tmp_path, "submit", "experiment", str(tmp_path / "big.toml"), "--dry-run")
    assert result.exit_code == 2 and "is not an experiment file" in result.output


@pytest.mark.parametrize("preset, dataset", [("cifar10", "cifar10"), ("imagenet", "imagenet")])
def test_a_dry_run_says_when_the_data_is_missing(tmp_path, preset, dataset):
    result = dsq(tmp_path, "submit", "experiment", str(PRESETS / f"{preset}.toml"), "--dry-run")
    assert result.exit_code == 0 and "dry run: nothing submitted" in result.output
    assert f"warning: {dataset} needs a data folder" in result.output and "would be refused" in result.output
    digits = dsq(tmp_path, "submit", "experiment", str(PRESETS / "digits.toml"), "--dry-run")
    assert "warning" not in digits.output


def test_the_same_experiment_twice_is_refused_and_a_new_name_runs_beside_it(tmp_path):
    path = tmp_path / "plan.toml"
    path.write_text(PLAN)
    first = dsq(tmp_path, "submit", "experiment", str(path))
    assert first.exit_code == 0, first.output
    count = len(jobs_in(tmp_path))
    again = dsq(tmp_path, "submit", "experiment", str(path))
    assert again.exit_code == 2 and f"experiment 't' already has {count} jobs" in again.output
    assert "--name t-2" in again.output and len(jobs_in(tmp_path)) == count
    assert dsq(tmp_path, "submit", "experiment", str(path), "--name", "t-2").exit_code == 0
    assert len(jobs_in(tmp_path)) == 2 * count


def test_a_key_typo_gets_a_suggestion_and_the_model_tables_are_shown_as_such(tmp_path):
    line = refused(tmp_path, PLAN.replace("sigmas =", "sigmaz ="))
    assert "unknown key 'sigmaz'; did you mean 'sigmas'?" in line
    assert "[models.NAME]" in line and ", models," not in line
    assert "unknown key 'epochz'; did you mean 'epochs'?" in refused(tmp_path, PLAN.replace("epochs = 1", "epochz = 1"))


def test_results_of_a_training_point_to_show(tmp_path):
    path = tmp_path / "plan.toml"
    path.write_text(PLAN)
    assert dsq(tmp_path, "submit", "experiment", str(path)).exit_code == 0
    result = dsq(tmp_path, "results", "1")
    assert result.exit_code == 2 and "job 1 is a training" in result.output and "dsq show 1" in result.output


def test_results_of_a_preview_say_what_it_is_and_where_it_shows(tmp_path):
    from dsq.kinds.preview import PreviewSpec

    path = tmp_path / "plan.toml"
    path.write_text(PLAN)
    assert dsq(tmp_path, "submit", "experiment", str(path)).exit_code == 0
    engine = open_database(f"sqlite:///{tmp_path / 'dsq.db'}")
    with session_scope(engine) as session:
        certify = next(job for job in repo.list_jobs(session, limit=100) if job.kind == "certify")
        spec = PreviewSpec(job=certify.id, image=0, of=certify.spec).to_dict()
        number = repo.create_job(session, kind="preview", spec=spec, seed=0).id
    engine.dispose()
    result = dsq(tmp_path, "results", str(number))
    assert result.exit_code == 2 and "no results yet" not in result.output, result.output
    assert f"job {number} is a preview of image 0 of job {certify.id}" in result.output, result.output

