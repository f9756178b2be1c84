"""The job database on real SQLite and PostgreSQL: schema, upserts, transactions, errors."""

from __future__ import annotations

import threading
import time
from datetime import timedelta, timezone

import numpy as np
import pytest
from alembic import command
from sqlalchemy import Engine, func, inspect, select

from dsq.db import repo
from dsq.db.models import Artifact, Job, JobLog, Result, WorkUnit
from dsq.db.session import (
    alembic_config,
    current_revision,
    default_database_url,
    head_revision,
    make_engine,
    open_database,
    session_scope,
    upgrade,
)
from dsq.errors import DatabaseUnreachable, InvalidArgument, JobNotFound, JobStateError

from .conftest import free_port

RADIUS = 0.123456789012345678


def certificate(**overrides):
    counts = dict(counts_selection=[0, 0, 0, 100], counts_estimation=[1, 2, 0, 997], n0=100, n=1000)
    bound = dict(label=3, prediction=3, radius=RADIUS, correct=True, p_lower=0.987654321098765432)
    settings = dict(alpha=0.001, sigma=0.25, seconds=1.5, worker="w1", device="cpu", extra={"seed": [1, 2]})
    return {**counts, **bound, **settings, **overrides}


def new_job(engine: Engine, **kwargs) -> int:
    with session_scope(engine) as s:
        return repo.create_job(s, kind="certify", spec={"sigma": 0.25}, seed=0, **kwargs).id


def count(engine: Engine, model) -> int:
    with session_scope(engine) as s:
        return s.scalar(select(func.count()).select_from(model))


# -- schema ----------------------------------------------------------------------------


def test_upgrade_empty_database_to_head_without_drift(db_url):
    engine = make_engine(db_url)
    try:
        assert current_revision(engine) is None
        upgrade(engine)
        assert current_revision(engine) == head_revision() is not None
        tables = set(inspect(engine).get_table_names())
        assert {"jobs", "work_units", "results", "artifacts", "job_logs"} <= tables
        with engine.begin() as connection:
            command.check(alembic_config(connection))  # raises when models and migrations differ
    finally:
        engine.dispose()


def test_the_head_revision_read_without_alembic_is_alembics(tmp_path, monkeypatch):
    """Every command compares the database's revision with the newest under migrations/, read from the files
    without Alembic's import: it is the head Alembic finds, and a second head (two files naming one parent) is an
    error rather than a guess."""
    from alembic.script import ScriptDirectory

    from dsq.db import session as session_module

    assert head_revision() == ScriptDirectory.from_config(alembic_config()).get_current_head() is not None
    versions = tmp_path / "versions"
    versions.mkdir()
    for name, revision, down in (("a", "0001", None), ("b", "0002", "0001"), ("c", "0003", "0001")):
        (versions / f"{name}.py").write_text(f"revision: str = {revision!r}\ndown_revision: str | None = {down!r}\n")
    monkeypatch.setattr(session_module, "MIGRATIONS_DIR", tmp_path)
    with pytest.raises(RuntimeError, match="several heads: 0002, 0003"):
        head_revision()
    (versions / "c.py").write_text("revision: str = '0003'\ndown_revision: str | None = '0002'\n")
    assert head_revision() == "0003"


def test_concurrent_first_use_upgrades_once(db_url):
    errors: list[BaseException] = []

    def first_use():
        try:
            open_database(db_url).dispose()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=first_use) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


# -- upserts ---------------------------------------------------------------------------


def test_upserting_a_result_twice_keeps_one_row_with_the_latest_values(engine):
    job_id = new_job(engine)
    with session_scope(engine) as s:
        repo.upsert_result(s, job_id, 7, **certificate())
    with session_scope(engine) as s:
        repo.upsert_result(s, job_id, 7, **certificate(prediction=-1, radius=0.0, correct=False, worker="w2"))
    with session_scope(engine) as s:
        (result,) = repo.results_for_job(s, job_id)
        assert (result.prediction, result.radius, result.correct, result.worker) == (-1, 0.0, False, "w2")
        assert repo.done_image_indices(s, job_id) == {7}


def test_results_keep_full_precision_and_accept_numpy_values(engine):
    job_id = new_job(engine)
    counts = np.array([5, 995], dtype=np.int64)
    with session_scope(engine) as s:
        numpy_fields = dict(radius=np.float64(RADIUS), prediction=np.int64(1), correct=np.bool_(True))
        repo.upsert_result(s, job_id, np.int64(2), **certificate(counts_estimation=counts, **numpy_fields))
        repo.upsert_result(s, job_id, 0, **certificate())
    with session_scope(engine) as s:  # a new session reads what the database stored
        first, second = repo.results_for_job(s, job_id)
    assert [first.image_index, second.image_index] == [0, 2]
    assert first.radius == second.radius == RADIUS and first.p_lower == 0.987654321098765432
    assert second.counts_estimation == [5, 995] and first.extra == {"seed": [1, 2]}
    assert first.created_at.tzinfo == timezone.utc


def test_result_with_missing_or_unknown_fields_is_refused(engine):
    job_id = new_job(engine)
    with session_scope(engine) as s, pytest.raises(TypeError, match="missing fields.*radius"):
        repo.upsert_result(s, job_id, 0, **{k: v for k, v in certificate().items() if k != "radius"})
    with session_scope(engine) as s, pytest.raises(TypeError, match="unknown fields.*colour"):
        repo.upsert_result(s, job_id, 0, **certificate(colour="red"))


def test_upserting_a_work_unit_keeps_one_row_and_counts_attempts(engine):
    job_id = new_job(engine)
    with session_scope(engine) as s:
        repo.upsert_work_unit(s, job_id, "image:3/shard:0", status="pending")
        repo.upsert_work_unit(s, job_id, "image:3/shard:0", status="running", worker="a")
    with session_scope(engine) as s:
        repo.upsert_work_unit(s, job_id, "image:3/shard:0", status="running", worker="b")
        unit = repo.upsert_work_unit(s, job_id, "image:3/shard:0", status="done", worker="b")
        assert (unit.status, unit.attempts, unit.worker) == ("done", 2, "b")
    with session_scope(engine) as s:
        (unit,) = repo.work_units(s, job_id)
        assert (unit.key, unit.status, unit.attempts) == ("image:3/shard:0", "done", 2)
        assert repo.work_units(s, job_id, status="pending") == []
    with session_scope(engine) as s, pytest.raises(InvalidArgument, match="work unit status"):
        repo.upsert_work_unit(s, job_id, "image:4", status="lost")


def test_upserting_an_artifact_keeps_one_row_with_the_latest_values(engine):
    job_id = new_job(engine)
    first = dict(kind="denoiser", location="/a/v1.pt", sha256="1" * 64, spec={"arch": "dncnn"}, metrics={})
    with session_scope(engine) as s:
        artifact_id = repo.upsert_artifact(s, job_id=job_id, name="denoiser", **first).id
    with session_scope(engine) as s:
        again = repo.upsert_artifact(s, job_id=job_id, name="denoiser", **{**first, "metrics": {"mse": 0.01}})
        assert again.id == artifact_id
    with session_scope(engine) as s:
        (stored,) = repo.artifacts_for_job(s, job_id)
        assert stored.metrics == {"mse": 0.01} and repo.get_artifact(s, artifact_id).sha256 == "1" * 64
    with session_scope(engine) as s:  # imported artifacts (no job) are keyed by name too
        repo.upsert_artifact(s, job_id=None, name="imported", **first)
        repo.upsert_artifact(s, job_id=None, name="imported", **{**first, "location": "/b.pt"})
    with session_scope(engine) as s:
        assert [a.location for a in repo.artifacts_for_job(s, None)] == ["/b.pt"]
    assert count(engine, Artifact) == 2


# -- transactions ----------------------------------------------------------------------


def test_a_rollback_leaves_nothing_half_written(engine):
    with pytest.raises(RuntimeError, match="worker died"):
        with session_scope(engine) as s:
            job = repo.create_job(s, kind="certify", spec={}, seed=1)
            repo.upsert_result(s, job.id, 0, **certificate())
            repo.upsert_work_unit(s, job.id, "image:0", status="done")
            repo.add_log(s, job.id, "half way")
            raise RuntimeError("worker died")
    assert [count(engine, model) for model in (Job, Result, WorkUnit, JobLog)] == [0, 0, 0, 0]


def test_concurrent_writers_on_one_sqlite_file_both_succeed(sqlite_url):
    job_id = new_job(open_database(sqlite_url))
    errors: list[BaseException] = []

    def writer(name: str, hold: float):
        engine = make_engine(sqlite_url)
        try:
            for index in range(20):
                with session_scope(engine) as s:
                    repo.upsert_result(s, job_id, index, **certificate(worker=name))
                    repo.upsert_work_unit(s, job_id, f"image:{index}", status="running", worker=name)
                    time.sleep(hold)  # keep the write lock while the other writer waits
        except BaseException as err:
            errors.append(err)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=writer, args=(f"w{i}", 0.01)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    engine = make_engine(sqlite_url)
    with session_scope(engine) as s:
        assert repo.done_image_indices(s, job_id) == set(range(20))
        assert {unit.attempts for unit in repo.work_units(s, job_id)} == {2}
    engine.dispose()


# -- jobs ------------------------------------------------------------------------------


def test_job_lifecycle(engine):
    job_id = new_job(engine, name="demo", total=10)
    with session_scope(engine) as s:
        job = repo.mark_running(s, job_id, "runner-1")
        assert (job.status, job.attempts, job.runner) == ("running", 1, "runner-1")
        started = job.started_at
        later = repo.heartbeat(s, job_id, now=started + timedelta(seconds=30)).heartbeat_at
        assert later - started == timedelta(seconds=30) and later.tzinfo == timezone.utc
        assert repo.set_progress(s, job_id, 4).progress_total == 10
        assert repo.set_progress(s, job_id, 5, total=12).progress_done == 5
    with session_scope(engine) as s:
        assert repo.mark_running(s, job_id, "runner-2").attempts == 2
        job = repo.mark_finished(s, job_id, "failed", error="boom", traceback="Traceback...")
    with session_scope(engine) as s:
        job = repo.get_job(s, job_id)
        assert (job.status, job.error, job.progress_done, job.progress_total) == ("failed", "boom", 5, 12)
        assert job.finished and job.finished_at >= job.started_at
        assert [j.id for j in repo.list_jobs(s, status="failed")] == [job_id]


def test_cancel_is_recorded_and_refused_once_finished(engine):
    job_id = new_job(engine)
    with session_scope(engine) as s:
        assert not repo.is_cancel_requested(s, job_id)
        repo.request_cancel(s, job_id)
    with session_scope(engine) as s:
        assert repo.is_cancel_requested(s, job_id)
        repo.mark_finished(s, job_id, "succeeded")
    with session_scope(engine) as s, pytest.raises(JobStateError, match="already succeeded"):
        repo.request_cancel(s, job_id)
    with session_scope(engine) as s:
        job = repo.mark_queued(s, job_id)
        assert (job.status, job.cancel_requested) == ("queued", False)


def test_unknown_job_raises_job_not_found(engine):
    with session_scope(engine) as s:
        for call in (repo.get_job, repo.request_cancel, repo.is_cancel_requested, repo.heartbeat):
            with pytest.raises(JobNotFound, match="no job with id 999"):
                call(s, 999)


def test_bad_kind_and_status_are_invalid_arguments(engine):
    job_id = new_job(engine)
    with session_scope(engine) as s:
        with pytest.raises(InvalidArgument, match="job kind 'paint'"):
            repo.create_job(s, kind="paint", spec={}, seed=0)
        with pytest.raises(InvalidArgument, match="final job status 'running'"):
            repo.mark_finished(s, job_id, "running")


def test_logs_in_order_and_followed_by_id(engine):
    job_id = new_job(engine)
    with session_scope(engine) as s:
        first = repo.add_log(s, job_id, "started")
        repo.add_log(s, job_id, "image 0 done", level="debug")
    with session_scope(engine) as s:
        assert [log.message for log in repo.logs_for_job(s, job_id)] == ["started", "image 0 done"]
        assert [log.level for log in repo.logs_for_job(s, job_id, after_id=first.id)] == ["debug"]


# -- URLs and connection errors --------------------------------------------------------


def test_default_url_comes_from_the_given_environment(tmp_path):
    assert default_database_url(env={}).endswith("/.dsq/dsq.db")
    assert default_database_url(env={"DSQ_HOME": str(tmp_path)}) == f"sqlite:///{tmp_path}/dsq.db"
    assert default_database_url(tmp_path / "h", env={}) == f"sqlite:///{tmp_path}/h/dsq.db"
    url = "postgresql://u@db/dsq"
    assert default_database_url(tmp_path, env={"DSQ_DATABASE_URL": url, "DSQ_HOME": "/x"}) == url


@pytest.mark.db
def test_sqlite_file_is_created_with_its_folder(tmp_path):
    engine = open_database(f"sqlite:///{tmp_path}/deep/er/dsq.db")
    assert (tmp_path / "deep" / "er" / "dsq.db").exists()
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
    engine.dispose()


@pytest.mark.db
def test_a_sqlite_file_that_cannot_be_written_is_refused_or_read_without_creating_files(tmp_path, monkeypatch):
    """The modes as a user other than root sees them (root ignores them; test_trust.py drops that for real)."""
    from dsq.db import session

    monkeypatch.setattr(session, "_writable", lambda path: bool(path.stat().st_mode & 0o200))
    url = f"sqlite:///{tmp_path}/dsq.db"
    engine = open_database(url)
    new_job(engine)
    engine.dispose()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dsq.db"]
    (tmp_path / "dsq.db").chmod(0o444)
    (tmp_path / "dsq.db-shm").touch(0o444)
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(DatabaseUnreachable) as refused:
            open_database(url)
        assert str(refused.value) == (f"cannot write to database {url}: not writable by this user: "
                                      f"{tmp_path}/dsq.db, {tmp_path}/dsq.db-shm, the folder {tmp_path}")
        reader = open_database(url, read_only=True)
        with session_scope(reader) as s:
            assert len(repo.list_jobs(s)) == 1
        reader.dispose()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["dsq.db", "dsq.db-shm"]
    finally:
        tmp_path.chmod(0o755)


@pytest.mark.db
@pytest.mark.parametrize(
    "url",
    [
        "postgresql://alice:s3cret@127.0.0.1:{port}/dsq",  # nobody listens there
        "postgres://alice:s3cret@127.0.0.1:{port}/dsq",
        "postgresql://alice:s3cret@127.0.0.1:notaport/dsq",  # malformed
        "not a url alice:s3cret@",
        "mysql://alice:s3cret@127.0.0.1/dsq",  # unsupported
    ],
)
def test_unreachable_or_malformed_url_is_one_line_with_password_masked(url):
    started = time.monotonic()
    with pytest.raises(DatabaseUnreachable) as caught:
        make_engine(url.format(port=free_port()))
    message = str(caught.value)
    assert "s3cret" not in message and "\n" not in message
    error = caught.value  # no driver traceback chained to it
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    assert "alice:***@" in message
    assert time.monotonic() - started < 10


def test_a_server_that_does_not_answer_is_told_apart_from_one_that_refuses():
    from dsq.db.session import not_answering

    class ConnectFailed(Exception):  # psycopg's OperationalError on a failed connect: no SQLSTATE
        sqlstate = None

    at = 'connection failed: connection to server at "127.0.0.1", port 5432 failed: '
    assert not_answering(ConnectFailed(at + "Connection refused"))
    assert not_answering(ConnectFailed(at + "FATAL:  the database system is starting up"))
    assert not_answering(ConnectFailed(at + "FATAL:  sorry, too many clients already"))
    assert not not_answering(ConnectFailed(at + 'FATAL:  database "dsq" does not exist'))
    assert not not_answering(ConnectFailed(at + 'FATAL:  password authentication failed for user "dsq"'))
    refused, shut = ConnectFailed("x"), ConnectFailed("x")
    refused.sqlstate, shut.sqlstate = "28P01", "57P01"  # with a SQLSTATE, its class decides
    assert not not_answering(refused) and not_answering(shut)
