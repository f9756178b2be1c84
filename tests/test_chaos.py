"""`dsq bench --chaos N`: its plan of faults, its checks of a run, bad options, and a short run with real faults."""

import os
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from bench import chaos
from cli.main import app
from dsq import smoothing
from dsq.db import repo
from dsq.db.session import session_scope
from dsq.kinds import certify


def test_each_kind_of_fault_comes_first_in_turn_and_a_run_has_one_to_per_run_faults():
    runs = chaos.plan(9, chaos.KINDS, 2, seed=3)
    assert [faults[0] for faults in runs[:4]] == list(chaos.KINDS) and runs[4][0] == "worker"
    assert all(1 <= len(faults) <= 2 and set(faults) <= set(chaos.KINDS) for faults in runs)
    assert any(len(faults) == 2 for faults in runs) and runs == chaos.plan(9, chaos.KINDS, 2, seed=3)
    assert all(len(faults) == 1 for faults in chaos.plan(5, ("worker", "postgres"), 1, seed=0))


def test_the_summary_counts_passed_runs_and_faults_by_kind():
    outcomes = [chaos.Outcome(0, seconds=10.0), chaos.Outcome(1, ["worker@3.0s", "node@5.0s"], seconds=20.0),
                chaos.Outcome(2, ["postgres@4.0s (down 3.0 s)"], ["sampler (none alive)"], 40.0, ["job 4 failed"])]
    assert chaos.summary(outcomes) == ("chaos: 1/2 runs passed; mean 30.0 s a run (undisturbed 10.0 s); faults: "
                                       "worker 1, sampler 0, node 1, postgres 1; 1 not made (no sampler alive, or the jobs "
                                       "had ended)")
    assert chaos.line(outcomes[2], 2) == ("run 2/2: postgres@4.0s (down 3.0 s), sampler (none alive); 40.0 s; "
                                          "FAILED: job 4 failed")


def test_the_process_table_gives_parent_group_and_program_so_a_ray_worker_is_found_by_its_raylet():
    """Ray's worker processes are sessions of their own: a sampler is known by its parent, a raylet of the world's
    process groups, not by its group."""
    me = chaos.processes()[os.getpid()]
    assert me == (os.getppid(), os.getpgrp(), open(f"/proc/{os.getpid()}/cmdline", "rb").read().split(b"\0")[0])


@pytest.mark.parametrize("args, message", [
    (["--chaos-faults", "worker,disk"], "--chaos-faults must name some of worker, sampler, node, postgres"),
    (["--chaos-per-run", "0"], "--chaos-per-run must be an integer >= 1, got 0"),
    (["--chaos-images", "0"], "--chaos-images must be an integer >= 1"),
    (["--chaos", "-1"], "--chaos must be an integer >= 1, got -1"),
])
def test_bad_chaos_options_are_one_line_and_exit_2(args, message):
    found = CliRunner().invoke(app, ["bench", *(["--chaos", "2"] if args[0] != "--chaos" else []), *args])
    assert found.exit_code == 2 and found.output.strip().startswith(f"error: {message}"), found.output
    assert len(found.output.strip().splitlines()) == 1


def test_a_run_fails_on_a_job_not_succeeded_a_missing_row_or_other_counts(engine):
    cert = smoothing.certify_counts([0, 5], [1, 99], alpha=0.001, sigma=0.25)
    with session_scope(engine) as session:
        ids = [repo.create_job(session, kind="certify", spec={}, seed=0, total=2).id for _ in range(2)]
        for job_id in ids:
            for image in (0, 1):
                certify.record_certificate(session, job_id, image, 1, cert, seconds=0.1, worker="w", device="cpu")
            repo.mark_finished(session, job_id, "succeeded")
    with session_scope(engine) as session:
        rows, problems = chaos.check(session, ids, None)
        assert problems == [] and rows[0] == rows[1] and len(rows[0]) == 2
        assert chaos.check(session, ids, rows)[1] == []
        other = [rows[0], [rows[1][0], rows[1][1][:3] + ([0, 1],) + rows[1][1][4:]]]
        assert chaos.check(session, ids, other)[1] == [f"job {ids[1]}: per-image counts differ from the undisturbed "
                                                       f"run's"]
        assert chaos.check(session, ids, [rows[0], rows[1][:1]])[1] == [f"job {ids[1]}: 2 rows, unlike the "
                                                                         f"undisturbed run's 1"]
        repo.mark_finished(session, ids[0], "failed", error="gave up")
    with session_scope(engine) as session:
        assert chaos.check(session, ids, rows)[1] == [f"job {ids[0]} failed (gave up)"]


def test_a_short_chaos_run_kills_a_worker_and_restarts_postgres_and_every_run_matches(tmp_path, starts_processes):
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "cli", "bench", "--chaos", "2", "--chaos-faults", "worker,postgres",
                          "--chaos-per-run", "1", "--chaos-images", "3"],
                         env=os.environ | {"RAY_AUTH_MODE": "disabled", "DSQ_HOME": str(tmp_path)},
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-1].startswith("chaos: 2/2 runs passed") and "worker 1, sampler 0, node 0, postgres 1" in lines[-1]
    assert any(line.startswith("run 1/2: worker@") and line.endswith("; ok") for line in lines), out.stdout
    assert any(line.startswith("run 2/2: postgres@") and line.endswith("; ok") for line in lines), out.stdout
    assert "Traceback" not in out.stderr, out.stderr
    print(f"chaos run of 2 took {time.monotonic() - started:.0f} s")
