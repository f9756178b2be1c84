"""The queue worker on a real local Ray: order, hand-back on signals, take-over after kill -9, --wait, submit."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsq import jobs
from sqlalchemy import select

from dsq.db import repo
from dsq.db.models import Worker
from dsq.db.session import open_database, session_scope
from dsq.settings import Settings
from workers.worker import QueueWorker
from dsq.kinds.certify import CertifySpec
from dsq.kinds.train import TrainSpec
from workers import pidfile
from tests.conftest import slow

DSQ = [sys.executable, "-m", "cli"]
def certify(images: int = 60, hold: Path | None = None) -> list[str]:
    """`dsq submit certify` options: ``images`` of the sleeping classifier (tests/slownet.py), 7 batches each, for
    seconds of wall-clock time and little CPU; held mid-way while the file ``hold`` exists."""
    return ["--dataset", "digits", *slow(hold=hold), "--sigma", "0.25", "--n0", "20", "--n", "3000",
            "--batch-size", "500", "--max-images", str(images), "--workers", "1"]


NOISE = ("Traceback", "*** SIG", "Aborted", "core dumped", "signal_handler", "(raylet)")


def env_for(home: Path, **extra) -> dict:
    return os.environ | {"DSQ_HOME": str(home), "RAY_ADDRESS": "", "DSQ_DATABASE_URL": "", **extra}


def dsq(home, *args, timeout=900, **extra):  # a deadline against hangs, generous for a busy machine
    return subprocess.run(DSQ + [str(a) for a in args], env=env_for(home, **extra), capture_output=True, text=True,
                          timeout=timeout)


def start(home, *args, **extra) -> subprocess.Popen:
    return subprocess.Popen(DSQ + [str(a) for a in args], env=env_for(home, **extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def engine_of(home):
    return open_database(f"sqlite:///{home / 'dsq.db'}")


def job(engine, job_id):
    with session_scope(engine) as session:
        return repo.get_job(session, job_id)


def stored(engine, job_id) -> dict[int, int]:
    with session_scope(engine) as session:
        return {r.image_index: r.id for r in repo.results_for_job(session, job_id)}


def wait_until(condition, timeout=300, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.3)
    raise AssertionError(f"{what} not met within {timeout} s")


def stop_group(process: subprocess.Popen) -> None:
    """Stop what a test started, by process group (its local Ray included)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


@pytest.fixture
def home(tmp_path, joins_local_ray):
    """A fresh home whose `dsq` processes join the session's Ray."""
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def serving(home, *args, **extra) -> subprocess.Popen:
    """A `dsq worker` process, once it is registered."""
    from dsq import jobqueue

    worker = start(home, "worker", *args, **extra)
    engine = engine_of(home)

    def registered():
        assert worker.poll() is None, worker.communicate()
        with session_scope(engine) as session:
            return bool(jobqueue.live_workers(session, Settings.from_env({}).stale_after))
    wait_until(registered, what="worker registered")
    return worker


@pytest.mark.usefixtures("ray_session")
def test_a_worker_runs_jobs_by_priority_then_age_once_their_dependencies_succeed(tmp_path):
    home = tmp_path / "home"
    config = Settings(database_url=f"sqlite:///{home / 'dsq.db'}", home=home)
    engine = open_database(config.database_url)
    train = dict(dataset="digits", target="classifier", arch="small_cnn", objective="standard", sigma=0.0, epochs=1)
    with session_scope(engine) as session:
        a = jobs.submit(session, TrainSpec(**train, name="a"), config).id
        b = jobs.submit(session, TrainSpec(**train, name="b"), config, priority=5).id
        c = jobs.submit(session, CertifySpec(dataset="digits", classifier=f"job:{a}", sigma=0.25, n0=10, n=50,
                                                   max_images=2, batch_size=50, workers=1), config, priority=9).id
    summary = QueueWorker(config, drain=True, max_jobs=1, log=lambda line: None).run()
    assert summary.ran == {a: "succeeded", b: "succeeded", c: "succeeded"}
    started = sorted((job(engine, j).started_at, j) for j in (a, b, c))
    assert [j for _, j in started] == [b, a, c]  # b outranks a; c outranks both but waits for a
    assert all(job(engine, j).attempts == 1 for j in (a, b, c))


def test_workers_stopped_by_signals_hand_the_job_back_a_killed_ones_is_taken_over_and_it_runs_once(home):
    """One job and the workers that run it in turn: two stopped mid-job by SIGTERM, then SIGINT, each hand it back
    with what it stored; a third killed with SIGKILL leaves it running with a stale heartbeat, which `dsq status`
    shows and the last worker takes over. Nothing stored is redone."""
    engine = engine_of(home)
    fast_stale = {"DSQ_STALE_SECONDS": "4"}
    before = {}
    for attempt, how in enumerate((signal.SIGTERM, signal.SIGINT, signal.SIGKILL), start=1):
        worker = serving(home, **fast_stale)
        try:
            if attempt == 1:
                out = dsq(home, "submit", "certify", *certify())
                assert out.returncode == 0 and out.stdout.strip() == "job 1" and "background worker" not in out.stderr
            wait_until(lambda: len(stored(engine, 1)) >= len(before) + 3, what="3 more results")
            worker.send_signal(how)
            stdout, stderr = worker.communicate(timeout=180)
        finally:
            stop_group(worker)
        now = stored(engine, 1)
        assert len(before) + 3 <= len(now) < 60 and {i: now[i] for i in before} == before  # nothing was redone
        assert job(engine, 1).attempts == attempt
        before = now
        if how == signal.SIGKILL:
            break
        assert worker.returncode == 128 + how and not any(noise in stdout + stderr for noise in NOISE), stdout + stderr
        assert f"stopped ({how.name}); ran 1 job(s); handed back to the queue: jobs 1" in stdout
        assert job(engine, 1).status == "queued"
        with session_scope(engine) as session:
            handed_back = [line for line in repo.logs_for_job(session, 1) if "handed back to the queue" in line.message]
        assert len(handed_back) == attempt
    assert job(engine, 1).status == "running"  # as the killed worker left it
    shown = {}
    wait_until(lambda: "stale (no heartbeat for" in shown.setdefault("out", dsq(home, "status", 1, **fast_stale).stdout)
               or shown.pop("out") is None, timeout=120, what="status says stale")
    assert "eta" not in shown["out"] and "rate" not in shown["out"]  # nothing live-looking about a dead job
    out = dsq(home, "worker", "--drain", **fast_stale)
    assert out.returncode == 0 and "its worker is gone (stale heartbeat); queued again" in out.stdout, out.stdout
    after = stored(engine, 1)
    assert job(engine, 1).status == "succeeded" and len(after) == 60 and job(engine, 1).attempts == 4
    assert {i: after[i] for i in before} == before


def test_submit_returns_at_once_and_wait_stops_following_on_a_signal(home):
    engine = engine_of(home)
    out = dsq(home, "submit", "certify", *certify())  # no worker alive: submit starts one in the background
    assert out.returncode == 0 and out.stdout.strip() == "job 1", out.stderr
    assert "started a background worker" in out.stderr
    assert job(engine, 1).status in ("queued", "running")  # the command returned before the job ended (no clock:
    # a busy machine can take tens of seconds to start any Python process)
    hold = home / "hold"  # jobs 2 and 3 wait on it mid-way, until a signal and a cancel have landed
    hold.touch()
    waiting = start(home, "submit", "certify", *certify(20, hold), "--seed", "3", "--wait")
    try:
        wait_until(lambda: status_of(engine, 2) == "running", what="job 2 running")
        waiting.send_signal(signal.SIGTERM)
        stdout, stderr = waiting.communicate(timeout=120)
    finally:
        stop_group(waiting)
        hold.unlink()
    assert waiting.returncode == 128 + signal.SIGTERM and not any(n in stdout + stderr for n in NOISE), stderr
    assert "SIGTERM: stopped following job 2; it goes on" in stderr
    wait_until(lambda: status_of(engine, 2) == "succeeded" and status_of(engine, 1) == "succeeded", timeout=900,
               what="both jobs done by the background worker")
    hold.touch()
    assert dsq(home, "submit", "certify", *certify(30, hold), "--seed", "4").returncode == 0
    assert dsq(home, "cancel", 3).returncode == 0
    hold.unlink()
    wait_until(lambda: status_of(engine, 3) == "cancelled", what="job 3 cancelled")
    failed = dsq(home, "resume", 3, "--wait")  # a cancelled job resumes and runs to its end
    assert failed.returncode == 0 and status_of(engine, 3) == "succeeded", failed.stderr


def status_of(engine, job_id) -> str | None:
    with session_scope(engine) as session:
        found = repo.list_jobs(session, limit=1_000)
        return next((j.status for j in found if j.id == job_id), None)


def test_the_autoscaler_is_asked_for_jobs_in_queue_order_within_the_cap():
    from workers.worker import demand_bundles

    demands = [{"GPU": 1.0}, {"GPU": 2.0}, {"GPU": 1.0}, {"CPU": 1.0}, {"GPU": 1.0}]
    assert demand_bundles(demands, {"GPU": 3}) == [{"GPU": 1.0}, {"GPU": 2.0}, {"CPU": 1.0}]
    assert demand_bundles(demands, {"GPU": 3, "CPU": 0.5}) == [{"GPU": 1.0}, {"GPU": 2.0}]
    assert demand_bundles([], {"GPU": 3}) == []


def test_an_api_job_asks_for_dsq_api_exactly_where_the_cluster_or_the_cap_offers_it(settings):
    """A plain Ray (no api nodes, no cap naming dsq_api) changes nothing: the job never waits for what nobody offers."""
    from ray._common.ray_option_utils import validate_actor_options

    from dsq.kinds import certify_api
    from workers import api_actor
    from workers.worker import demand_bundles

    spec = certify_api.ApiCertifySpec(provider="aws", sigma=0.25, dataset="digits")
    plain = QueueWorker(settings)
    assert plain._placeable({"CPU": 2.0}) == {"CPU": 2.0}
    assert certify_api.demand(spec, plain._placeable({"CPU": 2.0})) == {"CPU": 0.25}
    assert certify_api.actor_resources({"CPU": 0.25}) == {}
    assert api_actor.actor_options("aws") == {"name": "dsq-api-aws", "lifetime": "detached", "get_if_exists": True}
    # api nodes are up: the cluster has dsq_api, recorded with the worker's offers
    assert certify_api.demand(spec, {"CPU": 2.0, "dsq_api": 8.0}) == {"CPU": 0.25, "dsq_api": 1.0}
    assert plain._offers({"CPU": 2.0, "dsq_api": 8.0}) == {"CPU": 2.0, "GPU": 0.0, "dsq_api": 8.0}
    # none is up, but the autoscaler may launch them: the cap names dsq_api and GPUs (CPUs stay those of the nodes up)
    capped = QueueWorker(settings, max_request={"CPU": 64.0, "GPU": 8.0, "dsq_api": 16.0})
    cluster = capped._placeable({"CPU": 2.0})
    assert cluster == {"CPU": 2.0, "GPU": 8.0, "dsq_api": 16.0}
    # jobs that sample or train are sized for the GPUs the autoscaler may launch: their actors wait for gpu nodes
    from dsq import specs
    from workers import resources

    assert specs.default_workers(cluster) == 8 and resources.actor_options(8, cluster) == ({"num_gpus": 1.0,
                                                                                           "num_cpus": 0}, 1)
    held = certify_api.demand(spec, cluster)
    assert held == {"CPU": 0.25, "dsq_api": 1.0} and certify_api.actor_resources(held) == {"dsq_api": 1.0}
    options = api_actor.actor_options("aws", certify_api.actor_resources(held))
    assert options["resources"] == {"dsq_api": 1.0}
    validate_actor_options(options, in_options=True)  # what ApiActor.options(...) checks: Ray takes it
    # the autoscaler is asked for api-node bundles within the cap, a GPU job's beside them
    demands = [held] * 17 + [{"GPU": 1.0}]
    assert demand_bundles(demands, capped.max_request) == [held] * 16 + [{"GPU": 1.0}]


@pytest.mark.parametrize("text", ["GPU", "GPU=0", "GPU=-1", "GPU=x", "=3", "GPU=inf", "GPU=1,,CPU=2"])
def test_a_bad_resource_cap_is_one_line_exit_2(tmp_path, text):
    from typer.testing import CliRunner

    from cli.main import app

    out = CliRunner().invoke(app, ["worker", "--drain", "--max-request", text], env=env_for(tmp_path))
    assert out.exit_code == 2 and out.stderr.startswith("error: --max-request must look like"), out.output
    assert out.stderr.count("\n") == 1 and not (tmp_path / "dsq.db").exists()  # refused before the database


@pytest.mark.usefixtures("ray_session")
def test_actors_are_reused_for_the_same_kind_of_process_and_idle_ones_of_other_kinds_end():
    import ray

    from workers.pool import ActorPool

    @ray.remote(num_cpus=0)
    class Probe:
        def pid(self):
            return os.getpid()

    pool, started = ActorPool(), []

    def start():
        started.append(Probe.remote())
        return started[-1]

    first = pool.acquire("sampler x 2", 2, start)
    pool.release("sampler x 2", first, healthy=True)
    assert pool.acquire("sampler x 2", 1, start) == first[:1] and len(started) == 2  # reused, nothing started
    assert pool.idle == {"sampler x 2": first[1:]}  # the spare one stays for the next job
    pool.release("sampler x 2", first[:1], healthy=True)
    trainer = pool.acquire("trainer", 1, start)  # another kind: a new actor, and the idle samplers end
    assert len(started) == 3 and pool.idle == {}
    for ended in first:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(ended.pid.remote(), timeout=30)
    pool.release("trainer", trainer, healthy=False)  # a job that failed does not hand its actors on
    assert pool.idle == {}


@pytest.mark.usefixtures("ray_session")
def test_an_idle_worker_ends_the_actors_it_kept(tmp_path, monkeypatch):
    """Kept for the next job, a worker's actors end once it has had nothing to run for KEEP_ACTORS_SECONDS: an idle
    worker holds no CPUs that other workers or an autoscaler's scale-down wait for."""
    import threading

    from bench.config import PAIRS
    from bench.rayjobs import save_pair
    from workers import worker as worker_module

    monkeypatch.setattr(worker_module, "KEEP_ACTORS_SECONDS", 2.0)
    config = Settings(database_url=f"sqlite:///{tmp_path / 'dsq.db'}", home=tmp_path)
    engine = open_database(config.database_url)
    classifier, denoiser = save_pair(PAIRS["digits"], 0, tmp_path)
    with session_scope(engine) as session:
        job_id = jobs.submit(session, CertifySpec(dataset="digits", classifier=classifier, denoiser=denoiser,
                                                  sigma=0.25, n0=10, n=50, batch_size=50, max_images=1, workers=1,
                                                  previews=0), config).id
    worker, ended = QueueWorker(config, log=lambda line: None), []
    end = worker.pool._end
    worker.pool._end = lambda actors: (ended.extend(actors), end(actors))
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: job(engine, job_id).status == "succeeded", what="the job done")
        # the pool forgets its idle actors once it has ended them (ray.kill can take a while on a busy machine)
        wait_until(lambda: ended and worker.pool.idle == {}, timeout=120, what="the kept actors ended")
        assert thread.is_alive()  # ended by the idle worker, not by its stop
    finally:
        worker.stop("test over")
        thread.join(timeout=120)
    import ray

    assert len(ended) == 1  # its sampler, kept after the job
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(ended[0].input_channels.remote(None), timeout=30)
    engine.dispose()


@pytest.mark.usefixtures("ray_session")
def test_one_sampler_process_serves_each_f_o_d_it_is_asked_for_even_after_a_restart(tmp_path):
    """A sampler kept between jobs samples with the models each call names: the counts of a pipeline are the same
    from an actor that held another one before, and from an actor whose process died and came back."""
    import ray

    from bench.config import PAIRS
    from bench.rayjobs import save_pair
    from dsq import references, sampling
    from dsq.datasets import get_dataset
    from workers.sampler import SamplerActor

    def model(seed):
        folder = tmp_path / f"pair{seed}"
        folder.mkdir()
        classifier, denoiser = save_pair(PAIRS["digits"], seed, folder)
        return {"classifier": references.file_source(classifier), "denoiser": references.file_source(denoiser),
                "precision": "fp32", "compile": False}

    first, second = model(0), model(1)
    x = get_dataset("digits", "test")[0][0]
    shard = dict(sigma=0.5, start=0, count=200, batch_size=100, seed=3, image=0, phase=sampling.ESTIMATION)
    actor = SamplerActor.options(num_cpus=0).remote(Settings(database_url="sqlite://", home=tmp_path), 1)

    def counts(pipeline):
        return list(ray.get(actor.counts.remote(x, model=pipeline, **shard), timeout=600)["counts"])

    alone = counts(second)
    held_before = [counts(first), counts(second), counts(first)]
    assert held_before == [counts(first), alone, held_before[0]] and alone != held_before[0]
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    os.kill(pid, signal.SIGKILL)  # Ray restarts it (max_restarts): its __init__ runs again, with no model
    deadline = time.monotonic() + 600  # generous: a busy machine restarts a process in tens of seconds
    while True:
        try:
            assert counts(second) == alone
            break
        except ray.exceptions.RayActorError:  # calls fail while the actor restarts
            assert time.monotonic() < deadline, "the sampler did not come back"
            time.sleep(0.5)
    ray.kill(actor)


@pytest.mark.e2e
def test_three_real_workers_racing_over_eighteen_jobs_run_each_exactly_once(db_url, tmp_path, roomy_ray):
    """Three `dsq worker --drain` processes share one database and one Ray (``roomy_ray``: on the session's
    ``local_ray`` the sampler actors each worker keeps for its next job would hold CPUs the others wait for)."""
    from bench.config import PAIRS
    from bench.rayjobs import save_pair

    url = db_url
    classifier, denoiser = save_pair(PAIRS["digits"], 0, tmp_path)
    engine = open_database(url)
    config = Settings(database_url=url, home=tmp_path / "home")
    spec = CertifySpec(dataset="digits", classifier=classifier, denoiser=denoiser, sigma=0.25, n0=10, n=50,
                             batch_size=50, max_images=1, workers=1)
    with session_scope(engine) as session:
        ids = [jobs.submit(session, spec, config, priority=i % 3).id for i in range(18)]
    env = {"DSQ_DATABASE_URL": url, "OMP_NUM_THREADS": "1", "DSQ_LOCAL_RAY_ADDRESS": roomy_ray}
    workers = [start(tmp_path / "home", "worker", "--drain", "--max-jobs", "2", **env) for _ in range(3)]
    try:
        outputs = [worker.communicate(timeout=600) for worker in workers]
    finally:
        for worker in workers:
            stop_group(worker)
    assert all(worker.returncode == 0 for worker in workers), outputs
    with session_scope(engine) as session:
        found = [repo.get_job(session, job_id) for job_id in ids]
        rows = {job_id: len(repo.results_for_job(session, job_id)) for job_id in ids}
    assert all(job.status == "succeeded" and job.attempts == 1 for job in found)
    assert set(rows.values()) == {1}  # one certificate per job: no job ran twice, none was lost
    ran = [int(re.search(r"; ran (\d+) job", out).group(1)) for out, _ in outputs]
    assert sum(ran) == 18 and sum(1 for count in ran if count) >= 2, ran  # the work was shared
    engine.dispose()


@pytest.mark.e2e
def test_sigterm_stops_the_demo_cleanly_and_a_worker_finishes_its_experiment(tmp_path, joins_local_ray):
    """The suite's one run of the demo's 23 jobs (`dsq demo --quick`, one epoch each, few images): stopped by SIGTERM,
    then finished by `dsq worker --drain`. test_cli runs the demo itself to its end on 3 of its jobs."""
    demo = start(tmp_path, "demo", "--quick", "--max-images", "4", "--n", "100", "--plot", tmp_path / "demo.png")
    try:
        wait_until(lambda: (tmp_path / "dsq.db").exists() and status_of(engine_of(tmp_path), 3) == "running",
                   what="the demo's third job running")
        demo.send_signal(signal.SIGTERM)
        stdout, stderr = demo.communicate(timeout=180)
    finally:
        stop_group(demo)
    assert demo.returncode == 128 + signal.SIGTERM and not any(noise in stdout + stderr for noise in NOISE), stderr
    assert "demo stopped (SIGTERM); handed back: jobs" in stderr and "dsq worker --drain" in stderr
    engine = engine_of(tmp_path)
    with session_scope(engine) as session:
        found = repo.list_jobs(session, limit=100)
    assert len(found) == 23 and not any(j.status == "running" for j in found)
    assert dsq(tmp_path, "worker", "--drain").returncode == 0
    [experiment] = {j.experiment for j in found}
    out = dsq(tmp_path, "results", "--experiment", experiment, "--by-sigma", "--plot", tmp_path / "exp.png",
              COLUMNS="200")
    assert out.returncode == 0 and "sigma = 0.5: certified accuracy" in out.stdout, out.stderr
    assert "sigma = 0.25: certified accuracy" in out.stdout and "envelope across sigma" in out.stdout
    for method in ("no denoiser", "MSE", "STAB+MSE white-box", "STAB+MSE black-box", "Cohen et al.",
                   "diffusion (one-shot)"):
        assert method in out.stdout
    assert (tmp_path / "exp.png").stat().st_size > 1000
    with session_scope(engine) as session:
        finished = repo.list_jobs(session, limit=100)
        assert len(finished) == 23 and all(j.status == "succeeded" for j in finished)
        assert sum(len(repo.results_for_job(session, j.id)) for j in finished if j.kind == "certify") == 48
    engine.dispose()


@pytest.mark.db
def test_an_idle_worker_stops_serving_before_its_last_look_so_no_submitted_job_is_stranded(tmp_path):
    """The race of an idle exit with a submit: the worker first leaves the live list (and its pid file), then looks
    at the queue; a job there keeps it serving, else any later submit sees no worker and starts one."""
    from dsq import jobqueue

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'dsq.db'}", home=tmp_path)
    engine = open_database(settings.database_url)
    worker = QueueWorker(settings, idle_exit=1, name="w1")
    with session_scope(engine) as session:
        jobqueue.register_worker(session, name="w1", host="h", pid=os.getpid(), address=None, max_jobs=0)
    pid_file = pidfile.path(settings)
    pid_file.parent.mkdir(parents=True)
    pid_file.write_text(f"{os.getpid()}\n")

    def live():
        with session_scope(engine) as session:
            return [w.name for w in jobqueue.live_workers(session, settings.stale_after)]

    with session_scope(engine) as session:  # a job submitted just before the worker's last look
        jobs.submit(session, TrainSpec(dataset="digits", target="classifier", arch="small_cnn",
                                             objective="standard", sigma=0.0, epochs=1), settings)
    assert worker._retire(engine) is False and live() == ["w1"] and pid_file.read_text() == f"{os.getpid()}\n"
    with session_scope(engine) as session:
        repo.request_cancel(session, 1)
        jobs.finish(session, 1, "cancelled")
    assert worker._retire(engine) is True and live() == [] and not pid_file.exists()
    with session_scope(engine) as session:  # so a job submitted now starts a new worker
        assert not jobqueue.live_workers(session, settings.stale_after) and not pidfile.alive(pid_file)
    engine.dispose()


def test_a_drain_takes_over_the_job_of_a_killed_local_worker_at_once_and_leaves_a_live_ones_alone(home):
    """A worker killed with SIGKILL mid-job: `dsq worker --drain` started next on this machine sees its process is
    gone and takes the job over at once (not after the stale limit, set high here), resuming what was stored.
    While the first worker lived, a drain took nothing from it."""
    from dsq import jobqueue

    engine = engine_of(home)
    slow_stale = {"DSQ_STALE_SECONDS": "600"}  # only the dead pid can explain a take-over
    hold = home / "hold"  # the job waits on it once it has 3 results, until its worker is killed
    worker = serving(home, **slow_stale)
    try:
        out = dsq(home, "submit", "certify", *certify(hold=hold))
        assert out.returncode == 0 and out.stdout.strip() == "job 1", out.stderr
        wait_until(lambda: len(stored(engine, 1)) >= 3, what="3 results")
        hold.touch()
        alongside = dsq(home, "worker", "--drain", **slow_stale)  # the live worker's job is not its work
        assert alongside.returncode == 0 and "ran 0 job(s)" in alongside.stdout, alongside.stdout + alongside.stderr
        assert job(engine, 1).status == "running" and job(engine, 1).attempts == 1
        assert "died (" not in alongside.stdout
        before = stored(engine, 1)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=60)
    finally:
        stop_group(worker)
    assert job(engine, 1).status == "running" and len(before) < 60  # as the killed worker left it, mid-job
    hold.unlink()
    out = dsq(home, "worker", "--drain", **slow_stale)
    assert out.returncode == 0 and "ran 1 job(s)" in out.stdout, out.stdout + out.stderr
    assert f"died (pid {worker.pid} is gone); queued again" in out.stdout, out.stdout
    after = stored(engine, 1)
    taken = job(engine, 1)
    assert taken.status == "succeeded" and taken.attempts == 2 and len(after) == 60
    assert {i: after[i] for i in before} == before  # resumed: nothing stored was redone
    with session_scope(engine) as session:
        drainer = max(session.scalars(select(Worker)), key=lambda w: w.started_at)
        dead = [w for w in session.scalars(select(Worker)) if w.pid == worker.pid]
        assert len(dead) == 1 and dead[0].stopped_at is not None
        assert not any(w.pid == worker.pid for w in jobqueue.live_workers(session, Settings.from_env({}).stale_after))
    assert (taken.started_at - drainer.started_at).total_seconds() < 60  # within seconds of the drain's start


@pytest.mark.usefixtures("ray_session")
def test_a_detached_worker_that_meets_an_unexpected_error_is_started_again_and_serves(postgres_url, tmp_path):
    """An error the worker cannot place (here a table gone from under it) ends a detached worker's process, said in
    its log; Ray starts it again under its name, and once the table is back it registers again and runs jobs. It
    does not end for good, leaving submitted jobs to no one."""
    import ray
    from sqlalchemy import text

    from workers.worker import start_detached

    settings = Settings(database_url=postgres_url, home=tmp_path)
    engine = open_database(settings.database_url)

    def registered():
        with session_scope(engine) as session:
            return session.scalars(select(Worker)).one_or_none()

    name = start_detached(settings, idle_exit=300)
    actor = ray.get_actor(name)
    try:
        wait_until(lambda: registered() is not None, what="the worker registered")
        first = registered().started_at
        with engine.begin() as connection:
            connection.execute(text("ALTER TABLE jobs RENAME TO jobs_away"))
        wait_until(lambda: registered().stopped_at is not None, what="the worker stopped serving")
        with engine.begin() as connection:
            connection.execute(text("ALTER TABLE jobs_away RENAME TO jobs"))
        wait_until(lambda: registered().stopped_at is None and registered().started_at > first, timeout=120,
                   what="the worker registered again")
        with session_scope(engine) as session:
            job_id = jobs.submit(session, TrainSpec(dataset="digits", target="classifier", arch="small_cnn",
                                                    objective="standard", sigma=0.0, epochs=1), settings).id
        wait_until(lambda: job(engine, job_id).status == "succeeded", what="the job run")
        assert job(engine, job_id).runner == name and registered().name == name
    finally:
        ray.kill(actor, no_restart=True)
        engine.dispose()
