"""The dsq command in-process: a short tour, and every kind of bad input -> one line, exit 2, nothing written."""

import contextlib
import dataclasses
import json
import threading
from collections.abc import Iterator

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from dsq.db import repo
from dsq.db.session import open_database, session_scope
from tests.conftest import NARROW, free_port


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("cli-home")


@pytest.fixture(scope="module")
def dsq(home):
    runner = CliRunner()
    database = f"sqlite:///{home / 'dsq.db'}"
    env = {"DSQ_HOME": str(home), "RAY_ADDRESS": "", "DSQ_WORKER_AUTOSTART": "0"}  # see serving()

    def invoke(*args, db=database):
        return runner.invoke(app, ["--db", db, *map(str, args)], env=env)

    invoke.database = database
    return invoke


@contextlib.contextmanager
def serving(database: str, home) -> Iterator[None]:
    """Within the block a queue worker serves ``database`` from a thread of this process, on the session's Ray
    (ray_session): `--wait` is served without a background `dsq worker` process and a local Ray of its own."""
    from dsq.settings import Settings
    from workers.worker import QueueWorker

    open_database(database).dispose()  # the schema, before the worker and the CLI both look for it
    worker = QueueWorker(Settings(database_url=database, home=home), log=lambda line: None)
    thread = threading.Thread(target=worker.run, name="dsq-test-worker", daemon=True)
    thread.start()
    try:
        yield
    finally:
        worker.stop("the block ended")
        thread.join(timeout=120)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def trained(dsq, home, ray_session):
    """Job 1: a digits classifier; job 2: a certification with its results; job 3: a denoiser."""
    with serving(dsq.database, home):
        out = dsq("submit", "train", "--dataset", "digits", "--target", "classifier", *NARROW,
                  "--objective", "standard", "--sigma", "0", "--epochs", "2", "--name", "f", "--wait")
        assert out.exit_code == 0, out.output
        out = dsq("submit", "certify", "--dataset", "digits", "--classifier", "job:1", "--sigma", "0.25",
                  "--n0", "20", "--n", "200", "--batch-size", "100", "--max-images", "5", "--workers", "2", "--wait")
        assert out.exit_code == 0, out.output
        out = dsq("submit", "train", "--dataset", "digits", "--arch", "dncnn", "--objective", "mse",
                  "--arch-kwargs", '{"depth": 3, "width": 8}', "--epochs", "1", "--wait")
        assert out.exit_code == 0, out.output
    return home


def job_count(home):
    engine = open_database(f"sqlite:///{home / 'dsq.db'}")
    with session_scope(engine) as session:
        return len(repo.list_jobs(session, limit=10_000))


def test_tour(dsq, trained, tmp_path):
    listing = dsq("jobs").output
    assert "certify" in listing and "train" in listing and "succeeded" in dsq("status", 2).output
    assert "epoch 2/2" in dsq("logs", 1).output
    table = dsq("results", 2, "--radii", "0,0.25")
    assert table.exit_code == 0 and "r = 0.25" in table.output
    tsv = dsq("results", 2, "--format", "tsv").output.splitlines()
    assert tsv[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime" and len(tsv) == 6
    rows = json.loads(dsq("results", 2, "--format", "json").output)
    assert [r["image_index"] for r in rows] == [0, 1, 2, 3, 4]
    assert dsq("results", 2, "--format", "csv").output.startswith("image_index,")
    plot = tmp_path / "curves.png"
    out = dsq("compare", 2, 2, "--envelope", "--plot", plot)
    assert out.exit_code == 0 and "envelope" in out.output and plot.stat().st_size > 1000
    assert dsq("db", "upgrade").exit_code == 0


def corrupt_and_mismatched(home, tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a checkpoint")
    engine = open_database(f"sqlite:///{home / 'dsq.db'}")
    with session_scope(engine) as session:
        [artifact] = repo.artifacts_for_job(session, 1)
    from dsq import artifacts
    from dsq.settings import Settings

    local = artifacts.fetch(Settings(database_url="", home=home), artifact.location, artifact.sha256)
    original = torch.load(local, weights_only=True)
    original["arch_kwargs"] = original["arch_kwargs"] | {"width": 48}
    mismatched = tmp_path / "mismatched.pt"
    torch.save(original, mismatched)
    return corrupt, mismatched


CERTIFY = ["submit", "certify", "--dataset", "digits", "--classifier", "job:1", "--sigma", "0.25"]
TRAIN = ["submit", "train", "--dataset", "digits", "--arch", "dncnn", "--objective", "mse"]


def bad_inputs(home, tmp_path):
    corrupt, mismatched = corrupt_and_mismatched(home, tmp_path)
    port = free_port()
    return {
        "unknown job (status)": (["status", 999], "no job with id 999"),
        "unknown job (logs)": (["logs", 999], "no job"),
        "unknown job (results)": (["results", 999], "no job"),
        "unknown job (compare)": (["compare", 2, 999], "no job"),
        "unknown job (cancel)": (["cancel", 999], "no job"),
        "unknown job (resume)": (["resume", 999], "no job"),
        "unknown dataset": ([*CERTIFY[:3], "mnist", *CERTIFY[4:]], "mnist"),
        "unknown architecture": ([*TRAIN[:5], "unet", *TRAIN[6:]], "unet"),
        "unknown objective": ([*TRAIN[:7], "perceptual"], "perceptual"),
        "unknown denoiser": ([*CERTIFY, "--denoiser", "job:999"], "no job with id 999"),
        "sigma zero": ([*CERTIFY[:-1], "0"], "sigma"),
        "sigma negative": ([*CERTIFY[:-1], "-0.5"], "sigma"),
        "n0 zero": ([*CERTIFY, "--n0", "0"], "n0"),
        "n zero": ([*CERTIFY, "--n", "0"], "n must"),
        "batch zero": ([*CERTIFY, "--batch-size", "0"], "batch size"),
        "workers zero": ([*CERTIFY, "--workers", "0"], "workers must"),
        "unknown precision": ([*CERTIFY, "--precision", "fp8"], "precision must be one of fp32, bf16, fp16"),
        "alpha zero": ([*CERTIFY, "--alpha", "0"], "alpha"),
        "alpha one": ([*CERTIFY, "--alpha", "1.5"], "alpha"),
        "missing checkpoint": ([*CERTIFY, "--denoiser", tmp_path / "nope.pt"], "not found"),
        "corrupt checkpoint": ([*CERTIFY, "--denoiser", corrupt], "corrupt"),
        "mismatched checkpoint": ([*CERTIFY[:5], mismatched, *CERTIFY[6:]], "match"),
        "denoiser as classifier": ([*CERTIFY[:5], "job:3", *CERTIFY[6:]], "trains a denoiser, not a classifier"),
        "unknown radii": (["results", 2, "--radii", "a,b"], "radius"),
        "unknown format": (["results", 2, "--format", "xml"], "format"),
        "cancel finished job": (["cancel", 1], "already succeeded"),
        "unreachable ray": (["--address", f"127.0.0.1:{port}", *CERTIFY], "cannot reach Ray"),
        "unreachable database": (["--db", f"postgresql://u:hunter2@127.0.0.1:{port}/x", "jobs"], "***"),
        "malformed database": (["--db", "nonsense://", "jobs"], "nonsense"),
    }


def test_every_bad_input_is_one_line_exit_2_and_writes_nothing(dsq, trained, tmp_path):
    before = job_count(trained)
    failures = []
    for name, (args, expected) in bad_inputs(trained, tmp_path).items():
        if args[0] == "--db":
            out = dsq(*args[2:], db=args[1])
        else:
            out = dsq(*args)
        lines = out.stderr.strip().splitlines()
        ok = (out.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
              and expected.lower() in lines[0].lower() and "Traceback" not in out.output + out.stderr
              and "hunter2" not in out.stderr)
        if not ok:
            failures.append(f"{name}: exit {out.exit_code}, stderr {out.stderr!r}, exception {out.exception!r}")
    assert not failures, "\n".join(failures)
    assert job_count(trained) == before


def test_resume_of_a_running_job_is_refused(dsq, trained):
    engine = open_database(f"sqlite:///{trained / 'dsq.db'}")
    with session_scope(engine) as session:
        job = repo.create_job(session, kind="certify", spec=repo.get_job(session, 2).spec, seed=0)
        repo.mark_running(session, job.id, "elsewhere")
    out = dsq("resume", job.id)
    assert out.exit_code == 2 and "is running" in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.usefixtures("ray_session")
def test_quick_demo_runs_its_experiment_to_the_end_then_prints_and_plots_it(tmp_path, monkeypatch):
    """`dsq demo --quick` in-process, on 3 of the preset's 23 jobs (classifier f and its rows without a denoiser):
    it drains its own experiment, prints a table per sigma and the envelope, and writes the curves. All 23 jobs run
    end to end once in test_worker.py (the demo stopped by SIGTERM, then finished by `dsq worker --drain`)."""
    from dsq import demo as preset

    full_plan = preset.plan

    def three_jobs(**options):
        plan = full_plan(**options)
        kept = [s for s in plan.steps if s.key == "f" or s.meta.get("method") == "no denoiser"]
        return dataclasses.replace(plan, steps=kept)

    monkeypatch.setattr(preset, "plan", three_jobs)
    home = tmp_path / "demo-home"
    plot = tmp_path / "demo.png"
    out = CliRunner().invoke(app, ["--db", f"sqlite:///{home / 'dsq.db'}", "demo", "--quick", "--max-images", "4",
                                   "--n", "100", "--plot", str(plot)], env={"DSQ_HOME": str(home), "RAY_ADDRESS": ""})
    assert out.exit_code == 0, out.output
    assert "sigma = 0.25: certified accuracy" in out.output and "sigma = 0.5: certified accuracy" in out.output
    assert "envelope across sigma" in out.output and "no denoiser" in out.output
    assert "dsq results --experiment digits-demo-" in out.output and plot.stat().st_size > 1000
    engine = open_database(f"sqlite:///{home / 'dsq.db'}")
    with session_scope(engine) as session:
        finished = repo.list_jobs(session, limit=100)
        assert len(finished) == 3 and all(job.status == "succeeded" for job in finished)
        assert sum(len(repo.results_for_job(session, job.id)) for job in finished if job.kind == "certify") == 8
    engine.dispose()


def test_demo_refuses_a_plot_it_cannot_write_before_any_work(tmp_path):
    home = tmp_path / "demo-home"
    out = CliRunner().invoke(app, ["--db", f"sqlite:///{home / 'dsq.db'}", "demo", "--quick", "--plot",
                                   str(tmp_path / "curves.gif")], env={"DSQ_HOME": str(home), "RAY_ADDRESS": ""})
    assert out.exit_code == 2 and "must end in .png, .pdf or .svg" in out.stderr
    assert not (home / "dsq.db").exists()


def test_exports_carry_every_column_and_tables_paste_into_a_paper(dsq, trained):
    rows = json.loads(dsq("results", 2, "--format", "json").output)
    assert len(rows) == 5 and {"p_lower", "counts_estimation", "n0", "n", "alpha", "sigma", "worker",
                                "precision"} <= set(rows[0])
    assert rows[0]["n"] == 200 and rows[0]["precision"] == "fp32" and len(rows[0]["counts_selection"]) == 10
    header = dsq("results", 2, "--format", "csv").output.splitlines()[0].split(",")
    assert header[:6] == ["image_index", "label", "prediction", "radius", "correct", "seconds"] and "p_lower" in header
    markdown = dsq("compare", 2, 2, "--radii", "0,0.25", "--envelope", "--format", "markdown").output
    table, notes = markdown.split("\n\n")
    assert table.splitlines()[:2] == ["| job | images | r = 0 | r = 0.25 | ACR | abstain % |",
                                       "|---|---|---|---|---|---|"]
    assert len(table.splitlines()) == 5 and "5 images" in notes  # two rows and their envelope; few images
    latex = dsq("results", 2, "--radii", "0,0.25", "--format", "latex").output
    assert "\\begin{tabular}{lrrrr}" in latex and "certified accuracy \\% (clean)" in latex
    assert dsq("compare", 2, "--format", "tsv").exit_code == 2
