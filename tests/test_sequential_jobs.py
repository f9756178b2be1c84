"""Sequential certification at a target radius as jobs: on a real local Ray and SQLite, through the
real SDK clients against the emulators, and through the dsq command (bad input: one line, exit 2)."""

from __future__ import annotations

import collections
import json
import time

import pytest
import ray
from typer.testing import CliRunner

from cli.main import app
from dsq import bounds, datasets, fastpath, jobqueue, jobs, pipeline, references, sampling, smoothing
from dsq.apis import labels
from dsq.db import repo
from dsq.db.session import open_database, session_scope
from dsq.kinds import certify_api
from dsq.settings import Settings
from workers import api_runner, certify_loop
from workers.loop import Control

from .test_apis import api_spec, results
from .test_apis import db, emulator  # noqa: F401 - fixtures shared with test_apis
from tests.test_jobs import run, run_job, submit
from dsq.apis import results as api_results
from dsq.kinds.certify import CertifySpec
from dsq.kinds.train import TrainSpec


SIGMA, RADIUS, MAX_N, BATCH = 0.25, 0.2, 1000, 50


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_session):
    """A database with a trained digits classifier (job 1)."""
    home = tmp_path_factory.mktemp("sequential-home")
    config = Settings(database_url=f"sqlite:///{home / 'dsq.db'}", home=home)
    engine = open_database(config.database_url)
    f = run(config, engine, TrainSpec(dataset="digits", target="classifier", arch="small_cnn",
                                            objective="standard", sigma=0.0, epochs=2, batch_size=64, name="f"))
    yield config, engine, f
    engine.dispose()




def sequential_spec(f, **overrides):
    args = dict(dataset="digits", classifier=f"job:{f}", sigma=SIGMA, n0=30, radius=RADIUS, max_n=MAX_N,
                alpha=0.001, batch_size=BATCH, max_images=8, seed=5)
    return CertifySpec(**(args | overrides))


def rows_of(engine, job_id):
    with session_scope(engine) as session:
        return [(r.image_index, r.prediction, r.radius, r.p_lower, r.counts_selection, r.counts_estimation, r.n0,
                 r.n, r.extra["mode"], r.extra["target_radius"], r.extra["max_n"])
                for r in repo.results_for_job(session, job_id)]


def prepared_classifier(config, engine, f):
    """f as the sampler actors run it."""
    with session_scope(engine) as session:
        path = references.resolve(session, f"job:{f}", config)
    return fastpath.prepare_for_inference(pipeline.load(path, None, "cpu"), device="cpu")


# -- the certify job ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_worker(world):
    config, engine, f = world
    return run(config, engine, sequential_spec(f, workers=1))


def test_decisions_and_sample_counts_do_not_depend_on_worker_count(world, one_worker):
    config, engine, f = world
    three = run(config, engine, sequential_spec(f, workers=3))
    rows = rows_of(engine, one_worker)
    assert rows == rows_of(engine, three) and len(rows) == 8
    assert {row[8:] for row in rows} == {("sequential", RADIUS, MAX_N)}
    drawn = [row[7] for row in rows]
    assert min(drawn) < MAX_N  # some image stopped early
    assert all(n % BATCH == 0 or n == MAX_N for n in drawn)  # decisions fall at batch ends
    with session_scope(engine) as session:  # p_lower at each look, up to the stored one at the stop
        traces = [(r.extra["trace"], r.n, r.p_lower) for r in repo.results_for_job(session, one_worker)]
    assert all([n for n, _ in trace] == list(range(BATCH, n + 1, BATCH)) and trace[-1] == [n, p_lower]
               for trace, n, p_lower in traces)


def test_job_equals_in_process_certify_radius(world, one_worker):
    config, engine, f = world
    model = prepared_classifier(config, engine, f)
    test_set = datasets.get_dataset("digits", "test")
    for index, prediction, radius, p_lower, selection, estimation, n0, n, *_ in rows_of(engine, one_worker):
        cert = smoothing.certify_radius(model, test_set[index][0], sigma=SIGMA, radius=RADIUS, n0=30, max_n=MAX_N,
                                        alpha=0.001, batch_size=BATCH, seed=5, image=index)
        assert (cert.prediction, cert.radius, cert.p_lower, cert.n0, cert.n) == (prediction, radius, p_lower, n0, n)
        assert list(cert.counts_selection) == selection and list(cert.counts_estimation) == estimation
        assert cert.abstained or cert.radius >= RADIUS


@ray.remote(num_cpus=0)
class LateEvenBatches:
    """Samples like a SamplerActor, but holds every even estimation batch back, so batches come back out of order."""

    def __init__(self, classifier_path):
        import torch

        torch.set_num_threads(1)
        self.model = fastpath.prepare_for_inference(pipeline.load(classifier_path, None, "cpu"), device="cpu")

    def counts(self, x, model=None, **shard):
        if shard["phase"] == sampling.ESTIMATION and (shard["start"] // shard["batch_size"]) % 2 == 0:
            time.sleep(0.3)
        return {"counts": sampling.sample_counts(self.model, x, device="cpu", **shard), "worker": "late",
                "device": "cpu"}


class RecordingLoop(certify_loop.SequentialLoop):
    """The sequential loop, noting the order in which estimation batches come back."""

    arrivals: list

    def _take(self, state, shard, reply):
        if shard.phase == sampling.ESTIMATION:
            self.arrivals.append((state.index, shard.index))
        super()._take(state, shard, reply)


def test_batches_back_out_of_order_are_decided_in_batch_order(world, one_worker):
    config, engine, f = world
    spec = sequential_spec(f, workers=3, max_images=4)
    job_id = submit(config, engine, spec)
    with session_scope(engine) as session:
        path = references.resolve(session, f"job:{f}", config)
        jobqueue.take(session, job_id, "local")
    actors = [LateEvenBatches.remote(path) for _ in range(3)]
    loop = RecordingLoop(engine, job_id, Control(), spec, datasets.get_dataset("digits", "test"), actors, 0, 4)
    loop.arrivals = []
    loop.run(collections.deque(range(4)))
    late = [(image, batch) for position, (image, batch) in enumerate(loop.arrivals)
            if any(i == image and b > batch for i, b in loop.arrivals[:position])]
    assert late, loop.arrivals  # some batch came back after one that follows it
    assert rows_of(engine, job_id) == rows_of(engine, one_worker)[:4]


def test_automatic_batch_lets_the_test_look_often(world):
    config, engine, f = world
    job_id = run(config, engine, sequential_spec(f, batch_size=None, workers=1, max_images=2, max_n=2000))
    with session_scope(engine) as session:
        spec = jobs.load_spec(session, job_id)
        log = [line.message for line in repo.logs_for_job(session, job_id)]
    assert spec.batch_size == 2000 // 100  # SEQUENTIAL_LOOKS looks within max_n
    assert any("sequential at radius 0.2: a look every batch, at most 2000 samples" in m for m in log), log


# -- the command line ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def dsq(world):
    config, engine, f = world
    cli = CliRunner()

    def invoke(*args):
        return cli.invoke(app, ["--db", config.database_url, *map(str, args)],
                          env={"DSQ_HOME": str(config.home), "RAY_ADDRESS": "", "DSQ_WORKER_AUTOSTART": "0"})

    return invoke


CERTIFY = ["submit", "certify", "--dataset", "digits", "--classifier", "job:1", "--sigma", "0.25", "--n0", "20"]
API = ["submit", "certify-api", "--provider", "aws", "--endpoint", "embedded", "--dataset", "digits",
       "--max-images", "2", "--sigma", "0.25", "--n0", "5"]
BAD_INPUTS = {
    "radius zero": ([*CERTIFY, "--radius", "0"], "radius must be a finite number > 0, got 0.0"),
    "radius negative": ([*CERTIFY, "--radius", "-1"], "radius must be a finite number > 0, got -1.0"),
    "radius nan": ([*CERTIFY, "--radius", "nan"], "radius must be a finite number > 0, got nan"),
    "radius inf": ([*CERTIFY, "--radius", "inf"], "radius must be a finite number > 0, got inf"),
    "max n below n0": ([*CERTIFY, "--radius", "0.2", "--max-n", "10"], "max n must be at least n0 = 20, got 10"),
    "max n without radius": ([*CERTIFY, "--max-n", "500"], "needs a target radius (--radius)"),
    "n contradicts max n": ([*CERTIFY, "--radius", "0.2", "--n", "1000", "--max-n", "500"],
                            "--n 1000 contradicts --max-n 500"),
    "radius out of reach": ([*CERTIFY, "--radius", "0.8", "--max-n", "10000"],
                            "certify at most radius 0.7927 at sigma 0.25"),
    "radius out of reach of n": ([*CERTIFY, "--radius", "0.62", "--n", "1000"], "certify at most radius 0.6072"),
    "n too small to certify": ([*CERTIFY, "--n", "9"], "the smallest n that can is 10"),
    "api radius zero": ([*API, "--radius", "0"], "radius must be a finite number > 0"),
    "api radius out of reach": ([*API, "--radius", "0.5", "--max-n", "100"], "certify at most radius 0.3631"),
    "api max n without radius": ([*API, "--max-n", "100"], "needs a target radius"),
    "api n contradicts max n": ([*API, "--radius", "0.1", "--n", "50", "--max-n", "100"], "contradicts"),
    "api n too small": ([*API, "--n", "5"], "the smallest n that can is 10"),
}


def job_count(engine) -> int:
    with session_scope(engine) as session:
        return len(repo.list_jobs(session, limit=10_000))


def test_every_bad_sequential_input_is_one_line_exit_2_and_writes_nothing(world, dsq):
    config, engine, f = world
    before, failures = job_count(engine), []
    for name, (args, expected) in BAD_INPUTS.items():
        out = dsq(*args)
        lines = out.stderr.strip().splitlines()
        if not (out.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
                and expected in lines[0] and "Traceback" not in out.output + out.stderr):
            failures.append(f"{name}: exit {out.exit_code}, stderr {out.stderr!r}, exception {out.exception!r}")
    assert not failures, "\n".join(failures)
    assert job_count(engine) == before


def test_submit_says_what_a_job_can_certify(world, dsq):
    config, engine, f = world
    out = dsq(*CERTIFY, "--radius", "0.3", "--max-n", "5000")
    assert out.exit_code == 0, out.stderr
    assert "info: sequential: each image is certified at radius >= 0.3 or abstains, with at most 5,000" in out.stderr
    job_id = int(out.stdout.split()[-1])
    with session_scope(engine) as session:
        spec = jobs.load_spec(session, job_id)
    assert (spec.radius, spec.max_n, spec.n) == (0.3, 5000, 5000)
    out = dsq(*CERTIFY, "--radius", "0.3")  # --radius alone: up to n samples
    with session_scope(engine) as session:
        spec = jobs.load_spec(session, int(out.stdout.split()[-1]))
    assert (spec.max_n, spec.n) == (100_000, 100_000)
    out = dsq(*CERTIFY, "--n", "1000")
    largest = bounds.max_radius(1000, 0.001, 0.25)
    assert out.exit_code == 0 and f"info: n = 1,000 at alpha 0.001 certifies radius {largest:.4g} at most" in out.stderr
    out = dsq(*API, "--radius", "0.1", "--dry-run")
    assert out.exit_code == 0 and "n0 + max n + 1" in out.stderr and "info: sequential" in out.stderr
    with session_scope(engine) as session:
        for job in repo.list_jobs(session, limit=10_000, status="queued"):
            jobs.cancel(session, job.id, config.stale_after)


def test_results_of_a_sequential_job_answer_only_at_its_radius(world, dsq, one_worker):
    config, engine, f = world
    out = dsq("results", one_worker)
    assert out.exit_code == 0, out.stderr
    rows = rows_of(engine, one_worker)
    certified = sum(1 for row in rows if row[1] != -1 and row[2] >= RADIUS and row[1] == label_of(row[0]))
    drawn = sorted(row[7] for row in rows)
    assert f"certified accuracy % at radius {RADIUS:g}, 8 images" in out.stdout
    assert f"{100 * certified / 8:.1f}" in out.stdout
    assert f"{sum(drawn) / 8:,.0f}" in out.stdout and f"{(drawn[3] + drawn[4]) / 2:,.0f}" in out.stdout
    assert "does not answer other radii" in out.stdout and "r = 0.25" not in out.stdout
    refused = dsq("results", one_worker, "--radii", "0.25,0.5")
    assert refused.exit_code == 2 and "--radii does not apply" in refused.stderr
    assert [r["image_index"] for r in json.loads(dsq("results", one_worker, "--format", "json").stdout)] == list(range(8))
    assert "(sequential, r = 0.2)" in dsq("compare", one_worker).stdout


def label_of(index: int) -> int:
    return int(datasets.get_dataset("digits", "test")[index][1])


# -- certify-api ---------------------------------------------------------------------------


def billed_per_image(rows, ledger) -> list[int]:
    return [sum(ledger.answered[d] for d in {r.extra["sha256"]["clean"], *r.extra["sha256"]["selection"],
                                             *r.extra["sha256"]["estimation"]}) for r in rows]


@pytest.mark.usefixtures("ray_session")
def test_api_job_at_a_clear_radius_pays_a_fraction_of_n0_plus_n_plus_1(emulator, db, settings):
    server = emulator("google")
    spec = api_spec("google", server.endpoint, max_images=4, n0=5, n=200, radius=0.05)
    job_id = submit(settings, db, spec)
    assert run_job(settings, job_id) == "succeeded"
    rows = results(db, job_id)
    assert len(rows) == 4 and all(r.correct and r.radius >= 0.05 for r in rows)
    billed = billed_per_image(rows, server.ledger)
    assert billed == [r.n0 + r.n + 1 for r in rows]  # each query the test needed, paid once
    # The sequence runs at alpha/2 (the other half is kept for the final decision at max_n), so the least
    # clear of the four images needs a few more looks than the rest; all stay well under n0 + n + 1.
    assert sum(b <= (5 + 200 + 1) // 4 for b in billed) >= 3, billed
    assert all(b <= (5 + 200 + 1) * 2 // 5 for b in billed), billed
    assert all(r.n % api_runner.QUERY_BATCH == 0 and r.extra["mode"] == "sequential" for r in rows)
    assert all(r.extra["trace"][-1] == [r.n, r.p_lower] and len(r.extra["trace"]) == r.n // api_runner.QUERY_BATCH
               for r in rows)
    assert server.ledger.billed == sum(billed)
    with session_scope(db) as session:
        assert repo.count_paid_api_answers(session, job_id) == sum(billed)
        again = api_results.recertify(session, job_id)
    assert [(a["prediction"], a["radius"]) for a in again] == [(r.prediction, r.radius) for r in rows]

    fixed = submit(settings, db, api_spec("google", server.endpoint, max_images=4, n0=5, n=200))
    assert run_job(settings, fixed) == "succeeded"
    assert server.ledger.billed == 4 * (5 + 200 + 1)  # the fixed-n job reused every stored answer
    assert {count for count in server.ledger.answered.values()} == {1}


@pytest.mark.usefixtures("ray_session")
def test_api_sequential_job_within_a_budget_then_raised(emulator, db, settings):
    server = emulator("aws")
    spec = api_spec("aws", server.endpoint, max_images=12, n0=5, n=100, radius=0.05, max_queries=120)
    job_id = submit(settings, db, spec)
    assert run_job(settings, job_id) == "budget"
    done = results(db, job_id)
    assert 1 <= len(done) < 12 and server.ledger.billed <= 120
    with session_scope(db) as session:
        assert repo.get_job(session, job_id).error.startswith("query budget reached")
        certify_api.raise_budget(session, job_id, 1000)
        jobs.resume(session, job_id, settings.stale_after)
    assert run_job(settings, job_id) == "succeeded"
    rows = results(db, job_id)
    assert len(rows) == 12 and billed_per_image(rows, server.ledger) == [r.n0 + r.n + 1 for r in rows]
    assert set(server.ledger.answered.values()) == {1}  # nothing paid twice across the two runs


def test_api_sequential_certificate_replays_at_another_alpha_without_a_fixed_n_bound():
    clean, selection = "7", ["7"] * 5
    estimation = ["7"] * 18 + ["1"] * 2
    strict = labels.certify_labels_at_radius(clean, selection, estimation, radius=0.1, alpha=0.001, sigma=0.25,
                                           max_n=200, batch=10)
    loose = labels.certify_labels_at_radius(clean, selection, estimation, radius=0.1, alpha=0.2, sigma=0.25,
                                          max_n=200, batch=10)
    assert loose.certified_label == "7" and loose.cert.n == 10  # decided after the first batch
    assert strict.certified_label is None and strict.cert.n == 20  # the stored answers ran out undecided
    fixed = labels.certify_labels(clean, selection, estimation, alpha=0.001, sigma=0.25)
    assert fixed.certified_label == "7"  # a fixed-n bound on the same 20 answers would certify: never used here
