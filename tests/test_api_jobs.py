"""certify-api jobs on a real local Ray: the real SDK clients query the emulators through the API actors."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import ray

from dsq import jobs
from dsq.errors import InvalidArgument
from dsq.db import repo
from dsq.db.models import utcnow
from dsq.db.session import session_scope
from dsq.apis import results as api_results
from dsq.kinds import certify_api

from .test_apis import PER_IMAGE, PROVIDERS, api_spec, assert_each_paid_once, results, run, submit
from .test_apis import db, emulator  # noqa: F401 - fixtures shared with test_apis

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_job_completes_under_30_percent_throttling_paying_each_query_once(provider, emulator, db, settings):
    server = emulator(provider, throttle=0.3, seed=1)
    job_id = submit(db, settings, api_spec(provider, server.endpoint))
    assert run(settings, job_id) == "succeeded"
    rows = results(db, job_id)
    assert [row.image_index for row in rows] == [0, 1]
    assert all(row.radius > 0 and row.correct and row.extra["certified_label"] == row.extra["clean_label"]
               for row in rows)
    assert [row.extra["clean_label"] for row in rows] == ["zero", "one"]
    assert server.ledger.throttled > 0
    assert_each_paid_once(rows, server.ledger)
    assert server.ledger.billed == 2 * PER_IMAGE
    with session_scope(db) as session:
        assert repo.count_paid_api_answers(session, job_id) == 2 * PER_IMAGE
        assert not any("dsq_api" in log.message for log in repo.logs_for_job(session, job_id))  # a plain Ray
        again = api_results.recertify(session, job_id)  # offline, from the stored raw answers
        looser = api_results.recertify(session, job_id, alpha=0.05)
    assert [r["radius"] for r in again] == [row.radius for row in rows]
    assert all(a["radius"] > r["radius"] for a, r in zip(looser, again))
    assert server.ledger.billed == 2 * PER_IMAGE


@pytest.mark.e2e
def test_a_repeated_spec_and_a_runner_killed_midway_send_no_stored_query_again(emulator, db, settings, tmp_path):
    server = emulator("aws", latency=0.03)
    spec = api_spec("aws", server.endpoint, max_images=4, concurrency=2)
    job_id = submit(db, settings, spec)
    runner = start_runner_process(settings, job_id, tmp_path)
    try:
        wait_for(lambda: paid(db, job_id) >= PER_IMAGE + 3, runner)
    finally:
        runner.kill()  # the runner dies mid-image: queries in flight are still answered and stored by the actor
        runner.wait(timeout=30)
    with session_scope(db) as session:
        assert repo.get_job(session, job_id).status == "running"
        jobs.resume(session, job_id, settings.stale_after, now=utcnow() + 2 * settings.stale_after)
    assert run(settings, job_id) == "succeeded"
    rows = results(db, job_id)
    assert len(rows) == 4
    assert_each_paid_once(rows, server.ledger)
    assert server.ledger.billed == 4 * PER_IMAGE

    repeat = submit(db, settings, spec)
    assert run(settings, repeat) == "succeeded"
    assert server.ledger.billed == 4 * PER_IMAGE  # every answer came from the database
    same = [(r.radius, r.counts_estimation) for r in rows]
    assert [(r.radius, r.counts_estimation) for r in results(db, repeat)] == same


def test_budget_stops_the_job_before_it_is_exceeded_and_a_raised_budget_finishes_it(emulator, db, settings):
    server = emulator("google")
    budget = 2 * PER_IMAGE + 8
    job_id = submit(db, settings, api_spec("google", server.endpoint, max_images=3, max_queries=budget))
    assert run(settings, job_id) == "budget"  # a state of its own, not a failure
    with session_scope(db) as session:
        job = repo.get_job(session, job_id)
        assert job.error.startswith("query budget reached") and f"dsq resume {job_id} --max-queries" in job.error
        assert job.traceback is None  # a budget is a reason to stop, not a crash
        assert repo.count_paid_api_answers(session, job_id) <= budget
    assert server.ledger.billed <= budget
    assert len(results(db, job_id)) == 2  # partial results kept

    with session_scope(db) as session:
        paid = repo.count_paid_api_answers(session, job_id)
        with pytest.raises(InvalidArgument, match=f"needs --max-queries larger than {paid}"):
            certify_api.raise_budget(session, job_id, PER_IMAGE + 1)
        with pytest.raises(InvalidArgument, match=f"--max-queries M with M > {paid}"):
            jobs.resume(session, job_id, settings.stale_after)  # without a larger budget it would stop at once
    with session_scope(db) as session:
        certify_api.raise_budget(session, job_id, 3 * PER_IMAGE)
        jobs.resume(session, job_id, settings.stale_after)
    assert run(settings, job_id) == "succeeded"
    rows = results(db, job_id)
    assert len(rows) == 3
    assert_each_paid_once(rows, server.ledger)
    assert server.ledger.billed == 3 * PER_IMAGE


def test_an_unreadable_input_fails_alone_and_the_rest_of_the_job_goes_on(emulator, db, settings, tmp_path):
    from PIL import Image

    from dsq import datasets

    good = []
    for index in (0, 1):
        path = tmp_path / f"digit{index}.png"
        pixels = (datasets.get_dataset("digits", "test")[index][0][0].numpy() * 255).round().astype("uint8")
        Image.fromarray(pixels, "L").save(path)
        good.append(str(path))
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(open(good[0], "rb").read()[:40])
    server = emulator("azure")
    spec = api_spec("azure", server.endpoint, dataset=None, max_images=None,
                    inputs=(good[0], str(text), str(truncated), good[1]))
    job_id = submit(db, settings, spec)
    assert run(settings, job_id) == "succeeded"
    rows = results(db, job_id)
    assert [row.image_index for row in rows] == [0, 3]
    assert [row.extra["input"] for row in rows] == good
    with session_scope(db) as session:
        failed = repo.work_units(session, job_id, status="failed")
        warnings = [log.message for log in repo.logs_for_job(session, job_id) if log.level == "warning"]
    assert [unit.key for unit in failed] == ["image:1", "image:2"]
    assert all("not a readable image" in unit.error for unit in failed)
    assert len(warnings) == 2 and all("\n" not in w for w in warnings)
    assert server.ledger.billed == 2 * PER_IMAGE


# -- helpers ---------------------------------------------------------------------------


def paid(engine, job_id: int) -> int:
    with session_scope(engine) as session:
        return repo.count_paid_api_answers(session, job_id)


def wait_for(condition, process, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def start_runner_process(settings, job_id: int, tmp_path) -> subprocess.Popen:
    """A separate driver process that runs the job on the test session's Ray (killable by its pid)."""
    code = (
        "from dsq.settings import Settings\n"
        "from workers import resources, runner\n"
        f"resources.connect({ray.get_runtime_context().gcs_address!r})\n"
        f"runner.run_job(Settings(database_url={settings.database_url!r}, home=__import__('pathlib').Path("
        f"{str(settings.home)!r})), {job_id})\n")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
