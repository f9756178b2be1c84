"""`dsq delete JOB` and `dsq delete --experiment NAME`: jobs and their results go, in one transaction, on both
databases; never while a job runs or a queued or running job depends on one; artifacts stay unless --artifacts."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from cli import common
from cli.main import app
from dsq import artifacts, jobqueue
from dsq.db import repo
from dsq.db.models import ApiAnswer, Artifact, Job, JobDependency, JobLog, Preview, Result, WorkUnit
from dsq.db.session import open_database, session_scope


def dsq(db_url, home, *args, input=None):
    return CliRunner().invoke(app, ["--db", db_url, "delete", *map(str, args)], input=input,
                              env={"DSQ_HOME": str(home), "DSQ_WORKER_AUTOSTART": "0", "DSQ_ARTIFACTS": None})


def store(session, job_id, index):
    repo.upsert_result(session, job_id, index, label=1, prediction=1, radius=0.4, correct=True, p_lower=0.9,
                       counts_selection=[0, 10], counts_estimation=[0, 100], n0=10, n=100, alpha=0.001, sigma=0.25,
                       seconds=0.1)
    repo.upsert_work_unit(session, job_id, repo.image_unit(index), status="done")


@pytest.fixture
def plan(db_url, tmp_path):
    """Job 1 trained a model (an artifact in the store), job 2 certifies it (queued), both in experiment "e";
    job 3 is another experiment's training, running."""
    home = tmp_path / "home"
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    location, sha256 = artifacts.LocalStore(home / "artifacts").put(checkpoint)
    engine = open_database(db_url)
    with session_scope(engine) as session:
        train = repo.create_job(session, kind="train", spec={}, seed=0, total=1, experiment="e").id
        repo.mark_running(session, train, "w")
        repo.mark_finished(session, train, "succeeded")
        repo.upsert_artifact(session, job_id=train, name="denoiser", kind="denoiser", location=location,
                             sha256=sha256, spec={}, metrics={})
        certify = repo.create_job(session, kind="certify", spec={"sigma": 0.25}, seed=0, total=2, experiment="e").id
        jobqueue.add_dependencies(session, certify, [train])
        store(session, certify, 0)
        repo.add_log(session, certify, "hello")
        repo.upsert_preview(session, certify, 0, png=b"png", classes=[1, 1, 1, 1])
        repo.store_api_answer(session, provider="google", service="embedded", sha256="a" * 64, answer={},
                              top_label="cat", job_id=certify)
        other = repo.create_job(session, kind="train", spec={}, seed=0, total=1, experiment="x").id
        repo.mark_running(session, other, "w")
    yield engine, home, home / "artifacts" / location, (train, certify, other)
    engine.dispose()


def counts(engine) -> dict:
    with session_scope(engine) as session:
        return {model.__name__: session.scalar(select(func.count()).select_from(model))
                for model in (Job, JobDependency, Result, WorkUnit, JobLog, Artifact, ApiAnswer, Preview)}


def refused(out, expected):
    assert out.exit_code == 2 and expected in out.stderr, out.output
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.output


def test_delete_refuses_a_running_job_a_needed_job_and_asks_before_deleting(plan, db_url):
    engine, home, _, (train, certify, other) = plan
    before = counts(engine)
    refused(dsq(db_url, home, train, "--yes"), f"job {certify} (queued) depends on job {train}")
    refused(dsq(db_url, home, other, "--yes"), f"job {other} is running: cancel it first (dsq cancel {other})")
    refused(dsq(db_url, home, "--experiment", "e"), "pass --yes")  # no terminal to ask on
    refused(dsq(db_url, home, "999", "--yes"), "no job with id 999")
    refused(dsq(db_url, home, "--experiment", "nope", "--yes"), "no jobs in experiment 'nope'")
    refused(dsq(db_url, home, train, "--experiment", "e", "--yes"), "either")
    assert counts(engine) == before


def test_delete_removes_jobs_and_their_results_and_keeps_artifacts_and_paid_answers(plan, db_url, monkeypatch):
    engine, home, model_file, (train, certify, other) = plan
    monkeypatch.setattr(common, "stdin_is_terminal", lambda: True)
    out = dsq(db_url, home, certify, input="n\n")
    assert out.exit_code == 1 and "nothing deleted" in out.output and counts(engine)["Job"] == 3
    out = dsq(db_url, home, certify, input="y\n")
    assert out.exit_code == 0 and f"deleted job {certify}" in out.output, out.output
    with session_scope(engine) as session:
        assert [job.id for job in repo.list_jobs(session, limit=None)] == [other, train]
        assert not repo.results_for_job(session, certify) and not repo.work_units(session, certify)
        assert session.scalar(select(ApiAnswer.job_id)) is None  # the paid answer stays in the cache
    out = dsq(db_url, home, "--experiment", "e", "--yes")
    assert out.exit_code == 0 and f"deleted job {train}" in out.output and "kept 1 artifact(s)" in out.output
    assert model_file.is_file()
    with session_scope(engine) as session:
        assert session.scalars(select(Artifact.job_id)).all() == [None]
    assert counts(engine) | {"Job": 0} == {"Job": 0, "JobDependency": 0, "Result": 0, "WorkUnit": 0, "JobLog": 0,
                                           "Artifact": 1, "ApiAnswer": 1, "Preview": 0}


def test_delete_with_artifacts_removes_the_model_files_too(plan, db_url):
    engine, home, model_file, (train, certify, other) = plan
    out = dsq(db_url, home, "--experiment", "e", "--artifacts", "--yes")
    assert out.exit_code == 0 and f"deleted jobs {train}, {certify}" in out.output, out.output
    assert "removed 1 artifact(s)" in out.output and not model_file.exists()
    assert counts(engine)["Artifact"] == 0 and counts(engine)["Job"] == 1


def test_delete_removes_a_trainings_resumable_checkpoints_and_only_its_own(plan, db_url, tmp_path):
    """They are no artifact of the job (no row names them), so they go with the job even without --artifacts."""
    engine, home, model_file, (train, certify, other) = plan
    state = tmp_path / "state.pt"
    state.write_bytes(b"a resumable state")
    local = artifacts.LocalStore(home / "artifacts")
    for job in (train, other):
        local.put_at(state, f"resume/job-{job}/0123456789abcdef.pt")
    out = dsq(db_url, home, "--experiment", "e", "--yes")
    assert out.exit_code == 0 and "kept 1 artifact(s)" in out.output, out.output
    assert not (home / "artifacts" / "resume" / f"job-{train}").exists() and model_file.is_file()
    assert local.get_at(f"resume/job-{other}/0123456789abcdef.pt") is not None
