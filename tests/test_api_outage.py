"""A database that goes away while vision-API answers are being paid for: every paid answer is stored once the
database is back, none is paid twice, and a certify-api job rides out a PostgreSQL restart like any other job."""

from __future__ import annotations

import hashlib
import re
import subprocess
import threading
import time

import pytest
from sqlalchemy import event, exc

from dsq import datasets
from dsq.apis import base, emulators, providers, ratelimit
from dsq.apis.answers import AnswerDesk
from dsq.db import repo
from dsq.db.session import is_outage, open_database, session_scope

from .test_outage import DSQ, NOISE, env_for, finish, server, wait_until  # noqa: F401 - `server` is a fixture

JOB_IMAGES, N0, N = 8, 5, 60
PER_IMAGE = N0 + N + 1


# -- the actor's desk: store first, keep what could not be stored ----------------------


class Outage:
    """Every statement on ``engine`` fails as if the server went away while ``down`` is set."""

    def __init__(self, engine):
        self.down = threading.Event()
        event.listen(engine, "before_cursor_execute", self._refuse)

    def _refuse(self, conn, cursor, statement, parameters, context, executemany):
        if self.down.is_set():
            raise exc.OperationalError(statement, parameters, ConnectionError("server closed the connection"))


class GoesDownAfterAnswering:
    """A real SDK client whose answer arrives just as the database goes away."""

    def __init__(self, client, outage: Outage):
        self.client, self.outage, self.classify = client, outage, client.classify

    def detect(self, image: bytes):
        raw = self.client.detect(image)
        self.outage.down.set()
        return raw


@pytest.fixture
def desk_setup(sqlite_url):
    engine = open_database(sqlite_url)
    server = emulators.start("aws")
    outage = Outage(engine)
    client = GoesDownAfterAnswering(providers.make_client("aws", server.endpoint, {}), outage)
    limiter = ratelimit.Limiter(ratelimit.Limits(qps=1000.0, burst=100, concurrency=8))
    desk = AnswerDesk("aws", "emulator", client, limiter, lambda url, grace: engine, {})
    with session_scope(engine) as session:
        jobs = [repo.create_job(session, kind="certify_api", spec={}, seed=0).id for _ in range(2)]
    image = base.encode_png(datasets.get_dataset("digits", "test")[0][0])
    try:
        yield desk, engine, outage, server, jobs, image
    finally:
        server.stop()
        engine.dispose()


def stored(engine, digest):
    with session_scope(engine) as session:
        return repo.api_answers(session, "aws", "emulator", [digest]).get(digest)


def test_a_paid_answer_waits_out_a_short_outage_and_is_stored_once(desk_setup, sqlite_url):
    desk, engine, outage, server, (job, other), image = desk_setup
    digest = hashlib.sha256(image).hexdigest()
    replies = {}
    askers = [threading.Thread(target=lambda j=j: replies.__setitem__(j, desk.answer(sqlite_url, j, digest, image,
                                                                                     grace_seconds=60)))
              for j in (job, other)]
    askers[0].start()
    wait_until(outage.down.is_set, timeout=30)
    askers[1].start()  # the same bytes, asked while the answer waits for the database
    time.sleep(2.5)
    assert server.ledger.billed == 1 and desk.kept() == 1 and not replies
    outage.down.clear()
    for asker in askers:
        asker.join(timeout=30)
    assert replies[job] == {"sha256": digest, "top_label": "zero", "paid": True}
    assert replies[other] == {"sha256": digest, "top_label": "zero", "paid": False}
    assert stored(engine, digest).job_id == job and desk.kept() == 0 and server.ledger.billed == 1


def test_an_answer_paid_in_a_longer_outage_is_kept_and_never_paid_again(desk_setup, sqlite_url):
    desk, engine, outage, server, (job, other), image = desk_setup
    digest = hashlib.sha256(image).hexdigest()
    with pytest.raises(exc.DBAPIError) as gone:
        desk.answer(sqlite_url, job, digest, image, grace_seconds=0.5)
    assert is_outage(gone.value) and desk.kept() == 1 and server.ledger.billed == 1
    with pytest.raises(exc.DBAPIError):  # still down: the kept answer waits, the vendor is not asked again
        desk.answer(sqlite_url, other, digest, image, grace_seconds=0.5)
    outage.down.clear()
    assert desk.answer(sqlite_url, other, digest, image, grace_seconds=0.5) == \
        {"sha256": digest, "top_label": "zero", "paid": False}  # stored for the job that paid it
    assert stored(engine, digest).job_id == job and desk.kept() == 0 and server.ledger.billed == 1


# -- a certify-api job through a PostgreSQL restart ------------------------------------


def job_state(url, job_id):
    engine = open_database(url)
    try:
        with session_scope(engine) as session:
            job = repo.get_job(session, job_id)
            rows = {r.image_index: r for r in repo.results_for_job(session, job_id)}
            answers = repo.count_paid_api_answers(session, job_id)
            return job, rows, answers
    finally:
        engine.dispose()


def certified(rows) -> dict:
    return {i: (r.prediction, r.radius, r.correct, r.counts_selection, r.counts_estimation) for i, r in rows.items()}


def all_digests(rows) -> list[str]:
    out = []
    for row in rows.values():
        sha = row.extra["sha256"]
        out += [sha["clean"], *sha["selection"], *sha["estimation"]]
    return out


def submit(env, endpoint):
    done = subprocess.run(DSQ + ["submit", "certify-api", "--provider", "aws", "--endpoint", endpoint, "--dataset",
                                 "digits", "--max-images", str(JOB_IMAGES), "--sigma", "0.25", "--n0", str(N0),
                                 "--n", str(N), "--qps", "1000", "--burst", "100", "--concurrency", "8"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return int(re.search(r"^job (\d+)$", done.stdout, re.M).group(1))  # not always 1, 2: a restart skips ids


def test_a_certify_api_job_rides_out_a_database_restart_and_pays_each_query_once(tmp_path, server,
                                                                                 joins_local_ray):
    env = env_for(tmp_path, server)
    url = env["DSQ_DATABASE_URL"]
    config = emulators.EmulatorConfig(latency=0.15)  # answers in flight when the server stops
    with emulators.start("aws", config=config) as vendor, emulators.start("aws", config=config) as undisturbed:
        job_id = submit(env, vendor.endpoint)
        worker = subprocess.Popen(DSQ + ["worker", "--drain"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            wait_until(lambda: job_state(url, job_id)[2] >= 60, timeout=600)  # 60 answers stored: mid-flight
            server.stop()
            billed_at_stop = vendor.ledger.billed
            time.sleep(10)  # an outage well inside the grace (60 s), that answers in flight meet
            server.start()
            out, err = worker.communicate(timeout=600)
        finally:
            finish(worker)
        job, rows, paid = job_state(url, job_id)
        assert worker.returncode == 0 and "queue drained" in out, out + err
        assert not any(noise in out + err for noise in NOISE) and "lost" not in out, out + err
        assert job.status == "succeeded" and job.attempts == 1 and len(rows) == JOB_IMAGES, job.error
        digests = all_digests(rows)
        assert len(set(digests)) == JOB_IMAGES * PER_IMAGE > billed_at_stop  # the outage came mid-job
        assert vendor.ledger.billed == len(set(digests)) == paid  # each distinct query paid once, all stored
        assert set(vendor.ledger.answered) == set(digests) and set(vendor.ledger.answered.values()) == {1}

        other = submit(env, undisturbed.endpoint)  # the same job against another service: nothing cached, no outage
        drained = subprocess.run(DSQ + ["worker", "--drain"], env=env, capture_output=True, text=True, timeout=600)
        assert drained.returncode == 0, drained.stdout + drained.stderr
        again, rows_again, _ = job_state(url, other)
        assert again.status == "succeeded" and undisturbed.ledger.billed == len(set(digests))
        assert certified(rows_again) == certified(rows)
