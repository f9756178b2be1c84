"""Small things that misled: a training's status in epochs, a --wait bar wider than the terminal, a user model's
options on one long line."""

from __future__ import annotations

import io
import re
from datetime import timedelta

from rich.console import Console
from typer.testing import CliRunner

from cli import common
from cli.main import app
from dsq.db import repo
from dsq.db.models import utcnow
from dsq.db.session import open_database, session_scope


def dsq(url, *args):
    return CliRunner().invoke(app, ["--db", url, *map(str, args)], env={"DSQ_WORKER_AUTOSTART": "0"})


def test_status_of_a_training_counts_epochs(sqlite_url):
    engine = open_database(sqlite_url)
    with session_scope(engine) as session:
        job = repo.create_job(session, kind="train", spec={}, seed=0, total=10).id
        repo.mark_running(session, job, "w", now=utcnow() - timedelta(seconds=60))
        repo.heartbeat(session, job)
        repo.set_progress(session, job, 3)
    out = dsq(sqlite_url, "status", job).output
    said = re.search(r"epoch 3 of 10 done · (\d+) s an epoch · ETA (\d+) min", out)
    assert said and "items/s" not in out, out
    # 60 s for 3 epochs when the job was written; a busy machine may take a few seconds more to ask
    assert 20 <= int(said[1]) <= 25 and int(said[2]) in (2, 3), out


def test_the_wait_bar_stays_within_an_80_column_terminal(sqlite_url, monkeypatch):
    monkeypatch.setenv("DSQ_PROGRESS", "1")
    screen = io.StringIO()
    monkeypatch.setattr(common, "errors", Console(file=screen, width=80))
    engine = open_database(sqlite_url)
    with session_scope(engine) as session:
        job = repo.create_job(session, kind="certify", spec={"sigma": 0.25}, seed=0, total=364).id
        repo.mark_running(session, job, "w", now=utcnow() - timedelta(seconds=100))
        for index in range(300):
            repo.upsert_result(session, job, index, label=1, prediction=1, radius=0.4, correct=True, p_lower=0.9,
                               counts_selection=[0, 10], counts_estimation=[0, 100], n0=10, n=100, alpha=0.001,
                               sigma=0.25, seconds=0.1)
        repo.set_progress(session, job, 300)
        repo.mark_finished(session, job, "succeeded")
    assert common.follow(engine, job, f"job {job} (STAB+MSE white-box s=0.25)") == "succeeded"
    lines = screen.getvalue().splitlines()
    assert len(lines) == 1 and len(lines[0]) <= 80, lines
    assert "300/364 images" in lines[0]


def test_show_prints_a_user_models_options_one_per_line(sqlite_url):
    engine = open_database(sqlite_url)
    options = {"weights": "/models/net.weights.pt", "args": {"num_classes": 10}, "mean": [0.3], "std": [0.38],
               "code": "/models", "files": {"/models/net.weights.pt": "ab" * 32}}
    spec = {"classifier": "net:make", "sigma": 0.25, "models": {"net:make": options}}
    with session_scope(engine) as session:
        job = repo.create_job(session, kind="certify", spec=spec, seed=0, total=1).id
    lines = dsq(sqlite_url, "show", job).output.splitlines()
    start = lines.index("  models:")
    assert lines[start + 1:start + 8] == [
        "    net:make:", "      args = {'num_classes': 10}", "      code = '/models'",
        f"      files = {{'/models/net.weights.pt': '{'ab' * 32}'}}", "      mean = [0.3]", "      std = [0.38]",
        "      weights = '/models/net.weights.pt'"]
    assert not any(line.startswith("  models = ") for line in lines)
