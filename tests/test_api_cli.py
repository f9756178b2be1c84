"""``dsq submit certify-api`` and ``dsq emulate`` in-process and as a separate process: bad input, the
embedded default, dry runs, and credentials that never leak."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsq.apis import emulators, labels, providers
from dsq.db import repo
from dsq.db.session import open_database, session_scope

from .test_apis import PER_IMAGE

ROOT = Path(__file__).resolve().parents[1]
NO_CREDENTIALS = {name: None for name in (*providers.SECRET_VARS, "AWS_PROFILE", "GOOGLE_APPLICATION_CREDENTIALS",
                                        "VISION_ENDPOINT")}
APP = ("from cli import api, main, submit\n"
       "if 'certify-api' not in {c.name for c in submit.app.registered_commands}:\n"
       "    api.register(main.app, submit.app)\n"
       "main.app()\n")


def cli_app():
    """The dsq app with the certify-api commands (registered here until cli/main.py does it)."""
    from cli import api, main, submit

    if "certify-api" not in {command.name for command in submit.app.registered_commands}:
        api.register(main.app, submit.app)
    return main.app


@pytest.fixture
def dsq(tmp_path, opens_database):
    database = f"sqlite:///{tmp_path / 'dsq.db'}"
    env = {**NO_CREDENTIALS, "DSQ_HOME": str(tmp_path), "RAY_ADDRESS": "", "HOME": str(tmp_path),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none"),
           "AWS_EC2_METADATA_DISABLED": "true", "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"), "NO_GCE_CHECK": "True"}

    def invoke(*args):
        return CliRunner().invoke(cli_app(), ["--db", database, *map(str, args)], env=env)

    invoke.database = database
    return invoke


def job_count(database: str) -> int:
    engine = open_database(database)
    with session_scope(engine) as session:
        count = len(repo.list_jobs(session, limit=10_000))
    engine.dispose()
    return count


def test_bad_input_is_one_line_exit_2_and_nothing_written(dsq, tmp_path):
    base = ["submit", "certify-api", "--dataset", "digits", "--sigma", "0.25", "--endpoint", "embedded"]
    cases = {
        "unknown provider": (["--provider", "bing"], "unknown provider"),
        "aws credentials": (["--provider", "aws", "--endpoint", "vendor"], "AWS_ACCESS_KEY_ID"),
        "clarifai credentials": (["--provider", "clarifai", "--endpoint", "vendor"], "CLARIFAI_PAT"),
        "azure credentials": (["--provider", "azure", "--endpoint", "vendor"], "VISION_KEY"),
        "budget": (["--provider", "aws", "--max-queries", "50"], "smaller than one image needs"),
        "sigma": (["--provider", "aws", "--sigma", "-0.5"], "sigma"),
        "n0": (["--provider", "aws", "--n0", "0"], "n0"),
        "n": (["--provider", "aws", "--n", "0"], "n must"),
        "alpha": (["--provider", "aws", "--alpha", "1.5"], "alpha"),
        "missing input": (["--provider", "aws", "--dataset", "", "--input", str(tmp_path / "nope.png")], "not found"),
        "endpoint down": (["--provider", "aws", "--endpoint", "127.0.0.1:1"], "nothing answers"),
    }
    failures = []
    for name, (extra, expected) in cases.items():
        out = dsq(*base, *extra)
        lines = out.stderr.strip().splitlines()
        if not (out.exit_code == 2 and len(lines) == 1 and expected.lower() in lines[0].lower()
                and "Traceback" not in out.output):
            failures.append(f"{name}: exit {out.exit_code}, stderr {out.stderr!r}")
    assert not failures, "\n".join(failures)
    assert job_count(dsq.database) == 0


@pytest.mark.e2e  # the submit starts a background worker process, as a user's would
@pytest.mark.usefixtures("ray_session")
def test_embedded_emulator_is_the_default_without_credentials_and_dry_run_submits_nothing(dsq):
    args = ["submit", "certify-api", "--provider", "google", "--dataset", "digits", "--max-images", "1",
            "--sigma", "0.25", "--n0", "3", "--n", "10", "--qps", "500"]
    dry = dsq(*args, "--dry-run", "--max-queries", "100")
    assert dry.exit_code == 0, dry.output
    assert "target: the embedded emulator" in dry.stderr and "14 queries at most, budget 100" in dry.stderr
    assert "$0.02" in dry.stderr and "nothing submitted" in dry.stdout
    assert job_count(dsq.database) == 0
    out = dsq(*args, "--wait")
    assert out.exit_code == 0, out.output + out.stderr
    assert "job 1 succeeded" in out.stdout
    engine = open_database(dsq.database)
    with session_scope(engine) as session:
        [row] = repo.results_for_job(session, 1)
        assert row.extra["service"] == "embedded" and row.extra["provider"] == "google"
        assert row.n0 == 3 and row.n == 10 and row.extra["clean_label"] == "zero"
    engine.dispose()


@pytest.mark.e2e
def test_a_planted_secret_never_reaches_the_database_logs_or_output(tmp_path):
    secret = "SeCrEt-" + hashlib.sha256(os.urandom(16)).hexdigest()[:24]
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    database = f"sqlite:///{tmp_path / 'dsq.db'}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1", "RAY_TMPDIR": ray_tmp,
           "RAY_ADDRESS": "", "DSQ_HOME": str(tmp_path), "VISION_ENDPOINT": "https://example.invalid",
           "VISION_KEY": secret, "AWS_SECRET_ACCESS_KEY": secret, "AWS_ACCESS_KEY_ID": "AKIA" + secret[-8:],
           "CLARIFAI_PAT": secret}
    try:
        with emulators.start("azure", config=emulators.EmulatorConfig(throttle=0.3)) as server:
            command = [sys.executable, "-c", APP, "--db", database, "submit", "certify-api", "--provider", "azure",
                       "--dataset", "digits", "--max-images", "1", "--sigma", "0.25", "--n0", "5", "--n", "20",
                       "--qps", "500", "--endpoint", server.endpoint, "--wait"]
            done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
            logs = subprocess.run([sys.executable, "-c", APP, "--db", database, "logs", "1"], env=env, cwd=ROOT,
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stdout + done.stderr
            assert "job 1 succeeded" in done.stdout and "running on " in logs.stdout
            assert hashlib.sha256(secret.encode()).hexdigest() in server.ledger.credentials  # it was used
            assert server.ledger.billed == PER_IMAGE
        assert secret not in done.stdout + done.stderr + logs.stdout + logs.stderr
        assert secret not in "\n".join(sqlite3.connect(tmp_path / "dsq.db").iterdump())
        for path in Path(ray_tmp).rglob("*"):
            if path.is_file() and not path.is_socket():
                assert secret.encode() not in path.read_bytes(), f"the secret is in {path}"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.e2e
@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_dsq_emulate_serves_the_real_sdk_until_interrupted(tmp_path, how):
    import signal

    from dsq import datasets
    from dsq.apis import base

    from .conftest import free_port

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-c", APP, "emulate", "--provider", "clarifai", "--port", str(port)],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert f"127.0.0.1:{port}" in server.stdout.readline()
        client = providers.make_client("clarifai", f"127.0.0.1:{port}", {})
        raw = client.detect(base.encode_png(datasets.get_dataset("digits", "test")[0][0]))
        assert labels.top_label(providers.labels("clarifai", raw)) == "zero"
    finally:
        server.send_signal(signal.Signals[how])
        output, _ = server.communicate(timeout=180)  # a deadline against a hang, generous for a busy machine
    assert output.splitlines()[-1] == "served 1 answers" and "Traceback" not in output, output
    assert server.returncode == 128 + signal.Signals[how], output
