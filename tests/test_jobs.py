"""The job system on a real local Ray and a real SQLite file: train, certify, shard, cancel, resume, fail."""

import collections
import io
import os
import pathlib
import threading
import time
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
import ray
import torch
from PIL import Image

from dsq import datasets, fastpath, jobqueue, jobs, pipeline, previews, references, sampling, sizing, smoothing, views
from dsq.db import repo
from dsq.db.session import open_database, session_scope
from dsq.errors import CheckpointError, InvalidArgument, JobStateError
from dsq.settings import Settings
from workers import certify_loop, runner
from workers.loop import Control
from workers.pool import ActorPool
from dsq.kinds import preview
from dsq.kinds.certify import CertifySpec
from dsq.kinds.train import TrainSpec

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A database with a trained digits classifier (job 1) and MSE denoiser (job 2)."""
    home = tmp_path_factory.mktemp("jobs-home")
    config = Settings(database_url=f"sqlite:///{home / 'dsq.db'}", home=home)
    engine = open_database(config.database_url)
    f = run(config, engine, TrainSpec(dataset="digits", target="classifier", arch="small_cnn",
                                            objective="standard", sigma=0.0, epochs=2, batch_size=64, name="f"))
    d = run(config, engine, TrainSpec(dataset="digits", target="denoiser", arch="dncnn", objective="mse",
                                            sigma=0.25, epochs=1, batch_size=64, arch_kwargs={"depth": 3, "width": 8}))
    yield config, engine, f, d
    engine.dispose()


def submit(config, engine, spec) -> int:
    with session_scope(engine) as session:
        return jobs.submit(session, spec, config).id


# The actor processes (samplers, trainers) of the jobs a test runs, kept from job to job as a worker keeps them;
# ended with each test (conftest.py), so that idle actors never hold the CPUs the next test's own actors need.
ACTORS = ActorPool()


def run_job(config, job_id: int) -> str:
    """``runner.run_job`` as a worker calls it, with the tests' actor pool."""
    return runner.run_job(config, job_id, Control(pool=ACTORS))


def run(config, engine, spec) -> int:
    job_id = submit(config, engine, spec)
    assert run_job(config, job_id) == "succeeded", job_logs(engine, job_id)
    return job_id


def job_logs(engine, job_id):
    with session_scope(engine) as session:
        job = repo.get_job(session, job_id)
        return job.error, job.traceback


def certify_spec(f, d=None, **overrides):
    args = dict(dataset="digits", classifier=f"job:{f}", denoiser=f"job:{d}" if d else None, sigma=0.25,
                n0=30, n=300, alpha=0.001, batch_size=50, max_images=6, seed=5)
    return CertifySpec(**(args | overrides))


def rows_of(engine, job_id):
    with session_scope(engine) as session:
        return [(r.image_index, r.prediction, r.radius, r.counts_selection, r.counts_estimation)
                for r in repo.results_for_job(session, job_id)]


def test_training_job_stores_a_self_describing_checkpoint(world):
    config, engine, f, d = world
    with session_scope(engine) as session:
        [artifact] = repo.artifacts_for_job(session, f)
        job = repo.get_job(session, f)
        assert job.status == "succeeded" and job.progress_done == job.progress_total == 2
        assert artifact.kind == "classifier" and artifact.metrics["clean_accuracy"] > 0.5
    from dsq import artifacts, checkpoints
    _, meta = checkpoints.load_checkpoint(artifacts.fetch(config, artifact.location, artifact.sha256))
    assert meta["sha256"] == artifact.sha256 and meta["training_spec"]["name"] == "f"


def test_counts_and_radii_do_not_depend_on_worker_count(world):
    config, engine, f, d = world
    one = run(config, engine, certify_spec(f, d, workers=1))
    three = run(config, engine, certify_spec(f, d, workers=3))
    assert rows_of(engine, one) == rows_of(engine, three)
    assert len(rows_of(engine, one)) == 6


def test_previews_are_stored_for_the_first_images_and_change_no_count(world):
    """A job's first images get a preview from noise of their own: its counts are a job's without previews; a
    preview job asked through the queue (dsq preview) draws the same picture for another job's image."""
    config, engine, f, d = world
    pool = ActorPool()  # both jobs on one actor: what previews leave behind in it would show in the counts
    try:
        without, shown = (submit(config, engine, certify_spec(f, d, workers=1, max_images=3, previews=k))
                          for k in (0, 3))
        for job_id in (without, shown):
            assert runner.run_job(config, job_id, Control(pool=pool)) == "succeeded", job_logs(engine, job_id)
    finally:
        pool.close()
    assert rows_of(engine, without) == rows_of(engine, shown) and len(rows_of(engine, shown)) == 3
    with session_scope(engine) as session:
        assert repo.previewed_indices(session, without) == set()
        assert repo.previewed_indices(session, shown) == {0, 1, 2}
        made = repo.preview_for_image(session, shown, 2)
        spec = preview.request(session, without, 2, config)
    asked = run(config, engine, spec)
    with session_scope(engine) as session:
        served = repo.preview_for_image(session, without, 2)
        assert repo.get_job(session, asked).progress_done == 1
    assert (served.png, served.classes) == (made.png, made.classes) and len(made.classes) == previews.SAMPLES
    assert Image.open(io.BytesIO(made.png)).size == (5 * 64 + 4 * previews.GAP, 2 * 64 + previews.GAP)


def test_job_equals_in_process_certify(world):
    """The sharded job reproduces dsq.smoothing.certify on the same image and seed."""
    config, engine, f, d = world
    job = run(config, engine, certify_spec(f, d, workers=2, max_images=2))
    with session_scope(engine) as session:
        chain = pipeline.load(references.resolve(session, f"job:{f}", config),
                              references.resolve(session, f"job:{d}", config), "cpu")
    chain = fastpath.prepare_for_inference(chain, device="cpu")  # as the sampler actors run it
    test_set = datasets.get_dataset("digits", "test")
    for index, prediction, radius, selection, estimation in rows_of(engine, job):
        cert = smoothing.certify(chain, test_set[index][0], sigma=0.25, n0=30, n=300, alpha=0.001,
                                 batch_size=50, seed=5, image=index)
        assert (cert.prediction, cert.radius) == (prediction, radius)
        assert list(cert.counts_estimation) == estimation and list(cert.counts_selection) == selection


def test_automatic_sizing_is_recorded_and_kept(world):
    """workers/batch left to dsq: one 1-thread actor per CPU, the measured batch, fixed in the spec."""
    config, engine, f, d = world
    auto = run(config, engine, certify_spec(f, d, batch_size=None, workers=None, max_images=3))
    with session_scope(engine) as session:
        chain = pipeline.load(references.resolve(session, f"job:{f}", config),
                              references.resolve(session, f"job:{d}", config), "cpu")
        spec, log = jobs.load_spec(session, auto), [line.message for line in repo.logs_for_job(session, auto)]
    per_sample = sizing.memory_per_sample(chain, datasets.get_dataset("digits", "test")[0][0], "cpu")
    assert per_sample == 64 * 8 * 8 * 4  # the widest layer: small_cnn's second conv, 64 channels at 8x8, float32
    expected = sizing.choose_batch(per_sample, sizing.CPU_ACTIVATION_BYTES, n=300, workers=2)
    assert spec.batch_size == expected == 150 and spec.workers is None
    assert any(f"2 sampler actor(s) x 1 thread(s) on cpu, fp32; batch {expected} (chosen" in m for m in log), log
    given = run(config, engine, certify_spec(f, d, batch_size=expected, workers=1, max_images=3))
    assert rows_of(engine, auto) == rows_of(engine, given)
    tiny = run(config, engine, certify_spec(f, d, batch_size=8, workers=1, max_images=1))
    with session_scope(engine) as session:
        given_log, tiny_log = ([(line.level, line.message) for line in repo.logs_for_job(session, job)
                                if "sampler actor" in line.message] for job in (given, tiny))
    assert given_log[0][0] == "info" and "batch 150 (from the spec; automatic here: 300;" in given_log[0][1]
    assert tiny_log[0][0] == "warning" and "batch 8 (from the spec; automatic here: 300;" in tiny_log[0][1]
    with session_scope(engine) as session:
        repo.mark_queued(session, auto)  # a job run again keeps the batch it was certified with
    assert run_job(config, auto) == "succeeded"
    with session_scope(engine) as session:
        assert jobs.load_spec(session, auto).batch_size == expected


def test_reduced_precision_is_recorded_with_every_result(world):
    config, engine, f, d = world
    job = run(config, engine, certify_spec(f, d, precision="bf16", max_images=2, name="bf16 run"))
    with session_scope(engine) as session:
        extras = [r.extra for r in repo.results_for_job(session, job)]
        [(label, _)] = views.labelled_results(session, [job])
    assert len(extras) == 2 and all(e["model"]["precision"] == "bf16" for e in extras)
    assert label == "bf16 run (bf16)"


@ray.remote(max_restarts=1, max_task_retries=0)
class SamplerThatCrashesOnce:
    """Samples like a SamplerActor, but its process dies in the middle of its first shard."""

    def __init__(self, classifier_path, denoiser_path, marker):
        torch.set_num_threads(1)
        self.model = fastpath.prepare_for_inference(pipeline.load(classifier_path, denoiser_path, "cpu"),
                                                    device="cpu")
        self.marker = pathlib.Path(marker)

    def counts(self, x, model=None, **shard):
        if not self.marker.exists():
            self.marker.touch()
            os._exit(1)
        return {"counts": sampling.sample_counts(self.model, x, device="cpu", **shard), "worker": "w", "device": "cpu"}


def test_a_shard_lost_with_its_actor_is_sampled_again(world, tmp_path):
    """Ray does not retry this actor's tasks: the loop redoes the lost shard, with the same counts."""
    config, engine, f, d = world
    spec = certify_spec(f, d, workers=1, max_images=2)
    undisturbed = run(config, engine, spec)
    job_id = submit(config, engine, spec)
    with session_scope(engine) as session:
        paths = [references.resolve(session, f"job:{r}", config) for r in (f, d)]
    actor = SamplerThatCrashesOnce.remote(*paths, str(tmp_path / "crashed"))
    test_set = datasets.get_dataset("digits", "test")
    with session_scope(engine) as session:
        jobqueue.take(session, job_id, "local")
    certify_loop.CertifyLoop(engine, job_id, Control(), spec, test_set, [actor], 0, 2).run(collections.deque([0, 1]))
    assert (tmp_path / "crashed").exists() and rows_of(engine, job_id) == rows_of(engine, undisturbed)
    with session_scope(engine) as session:
        warnings = [line.message for line in repo.logs_for_job(session, job_id) if line.level == "warning"]
    # the crash takes the shards queued on the actor with it (ActorDiedError or ActorUnavailableError)
    assert 1 <= len(warnings) <= certify_loop.TASKS_PER_ACTOR, warnings
    assert all(" lost its sampler (Actor" in w and w.endswith("retrying") for w in warnings), warnings


def run_in_thread(config, job_id):
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(status=run_job(config, job_id)))
    thread.start()
    return thread, outcome


def wait_for_results(engine, job_id, at_least, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope(engine) as session:
            if len(repo.done_image_indices(session, job_id)) >= at_least:
                return
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} stored fewer than {at_least} results in {timeout} s")


def test_cancel_stops_within_seconds_then_resume_completes_without_duplicates(world):
    config, engine, f, d = world
    spec = certify_spec(f, d, max_images=20, n=2000, batch_size=100, workers=2)
    job_id = submit(config, engine, spec)
    thread, outcome = run_in_thread(config, job_id)
    wait_for_results(engine, job_id, 2)
    with session_scope(engine) as session:
        jobs.cancel(session, job_id, config.stale_after)
    asked = time.monotonic()
    thread.join(timeout=30)
    assert not thread.is_alive() and time.monotonic() - asked < 10
    assert outcome["status"] == "cancelled"
    before = rows_of(engine, job_id)
    assert 2 <= len(before) < 20
    with session_scope(engine) as session:
        stored_ids = {r.image_index: r.id for r in repo.results_for_job(session, job_id)}
        jobs.resume(session, job_id, config.stale_after)
    assert run_job(config, job_id) == "succeeded"
    after = rows_of(engine, job_id)
    assert len(after) == 20 and len({r[0] for r in after}) == 20
    assert [r for r in after if r[0] in stored_ids] == before  # stored rows untouched
    with session_scope(engine) as session:
        assert {r.image_index: r.id for r in repo.results_for_job(session, job_id) if r.image_index in stored_ids} == stored_ids


def test_resume_refuses_a_live_runner_and_accepts_a_dead_one(world):
    config, engine, f, d = world
    job_id = submit(config, engine, certify_spec(f, max_images=1))
    now = datetime.now(timezone.utc)
    with session_scope(engine) as session:
        repo.mark_running(session, job_id, "somewhere", now=now)
        with pytest.raises(JobStateError, match="is running"):
            jobs.resume(session, job_id, config.stale_after, now=now + timedelta(seconds=5))
        jobs.resume(session, job_id, config.stale_after, now=now + timedelta(minutes=5))  # stale: runner died
    assert run_job(config, job_id) == "succeeded"
    with session_scope(engine) as session:
        with pytest.raises(JobStateError, match="already succeeded"):
            jobs.resume(session, job_id, config.stale_after)
        with pytest.raises(JobStateError):
            jobs.cancel(session, job_id, config.stale_after)


def test_failed_job_keeps_error_and_traceback(world, tmp_path):
    config, engine, f, d = world
    with session_scope(engine) as session:
        path = references.resolve(session, f"job:{f}", config)
    copy = tmp_path / "f.pt"
    copy.write_bytes(open(path, "rb").read())
    job_id = submit(config, engine, certify_spec(f, max_images=1, classifier=str(copy)))
    copy.write_bytes(b"not a checkpoint")
    assert run_job(config, job_id) == "failed"
    error, trace = job_logs(engine, job_id)
    assert "changed after the job was submitted" in error and "Traceback" in trace


def test_submit_rejects_bad_references_and_writes_nothing(world, tmp_path):
    config, engine, f, d = world
    with session_scope(engine) as session:
        before = len(repo.list_jobs(session, limit=1000))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    cases = [(certify_spec(f, denoiser=str(tmp_path / "missing.pt")), CheckpointError),
             (certify_spec(f, denoiser=str(bad)), CheckpointError),
             (certify_spec(d), InvalidArgument),  # a denoiser used as classifier: no [B, K] logits
             (certify_spec(f, denoiser=f"job:{f}"), InvalidArgument)]
    for spec, error in cases:
        with pytest.raises(error):
            with session_scope(engine) as session:
                jobs.submit(session, spec, config)
    with session_scope(engine) as session:
        assert len(repo.list_jobs(session, limit=1000)) == before


def test_work_units_track_images(world):
    config, engine, f, d = world
    job_id = run(config, engine, certify_spec(f, max_images=3))
    with session_scope(engine) as session:
        units = repo.work_units(session, job_id)
    assert sorted(u.key for u in units) == ["image:0", "image:1", "image:2"]
    assert all(u.status == "done" and u.attempts == 1 for u in units)
    assert np.isfinite([r[2] for r in rows_of(engine, job_id)]).all()
