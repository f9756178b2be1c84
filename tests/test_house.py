"""The shape of the code: imports run one way, the library does not know who runs it, steering stays light."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dsq import jobqueue, kinds
from dsq.db import repo
from dsq.db.session import open_database, session_scope
from dsq.kinds.certify_api import ApiCertifySpec
from dsq.kinds.train import TrainSpec

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dsq", "workers", "cli", "bench")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports_of(name: str, path: Path, known: dict) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (inside functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            wanted = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            wanted = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in wanted:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
    return targets


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_imports_run_one_way():
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    assert len(graph) > 60 and sum(map(len, graph.values())) > 250  # the walk sees the whole tree
    assert circles(graph) == []
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]  # and would see one


def test_the_library_neither_imports_nor_names_workers_cli_or_bench():
    known = modules()
    named = re.compile(r"\b(workers|cli|bench)(\.[A-Za-z_]\w*|/\w)")
    found = []
    for name, path in known.items():
        if not name.startswith("dsq"):
            continue
        imported = [t for t in imports_of(name, path, known) if t.split(".")[0] in ("workers", "cli", "bench")]
        found += [f"{name} imports {t}" for t in imported]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and named.search(node.value):
                found.append(f"{name}:{node.lineno} names {named.search(node.value).group(0)}")
    assert found == []


def test_every_kind_has_one_loop_and_one_spec():
    from workers.runner import LOOPS

    assert set(LOOPS) == set(kinds.KINDS)
    for name, kind in kinds.KINDS.items():
        assert kind.name == name and kind.spec.__dataclass_params__.frozen


BLOCKED = """
import os, sys

REFUSED = os.environ.get("DSQ_TEST_REFUSED", "torch,ray,torchvision,sklearn").split(",")

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in REFUSED:
            raise ImportError(f"this command imported {name}")

sys.meta_path.insert(0, Refuse())
from cli.main import app
app()
"""


@pytest.mark.e2e
def test_steering_and_reading_commands_import_neither_torch_nor_ray(tmp_path):
    url = f"sqlite:///{tmp_path / 'dsq.db'}"
    engine = open_database(url)
    train = TrainSpec(dataset="digits", target="classifier", arch="small_cnn", objective="standard", sigma=0.0)
    api = ApiCertifySpec(provider="google", sigma=0.25, dataset="digits", endpoint="embedded", n0=5, n=20,
                         max_queries=1000)
    with session_scope(engine) as session:
        first = repo.create_job(session, kind="train", spec=train.to_dict(), seed=0, total=1).id
        second = repo.create_job(session, kind="certify_api", spec=api.to_dict(), seed=0, total=1).id
        third = repo.create_job(session, kind="train", spec=train.to_dict(), seed=0, total=1).id
        jobqueue.register_worker(session, name="w", host="h", pid=1, address=None, max_jobs=0,
                                 resources={"CPU": 4.0, "GPU": 1.0})  # a job's state then weighs its demand
        jobqueue.worker_heartbeat(session, "w", free={"CPU": 4.0, "GPU": 0.0})
    engine.dispose()

    def dsq(*args: str) -> str:
        done = subprocess.run([sys.executable, "-c", BLOCKED, "--db", url, *args], capture_output=True, text=True,
                              cwd=ROOT, env={"PATH": "/usr/bin:/bin", "DSQ_HOME": str(tmp_path),
                                             "DSQ_WORKER_AUTOSTART": "0"}, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert f"job {first}" in dsq("cancel", str(first)) and "cancelled" in dsq("status", str(first))
    assert "queued" in dsq("resume", str(first))
    dsq("cancel", str(second))
    dsq("resume", str(second), "--max-queries", "2000")  # rebuilds the API spec with a new budget
    assert "2000" in dsq("show", str(second)) and "certify_api" in dsq("jobs") and "GPU" in dsq("jobs")
    assert kinds.from_dict(repo_spec(url, second)).max_queries == 2000
    assert f"deleted job {third}" in dsq("delete", str(third), "--yes") and f"{third}  " not in dsq("jobs")


def repo_spec(url: str, job_id: int) -> dict:
    engine = open_database(url)
    with session_scope(engine) as session:
        spec = repo.get_job(session, job_id).spec
    engine.dispose()
    return spec


@pytest.mark.e2e
def test_a_submit_to_an_upgraded_database_imports_neither_alembic_nor_scipy(tmp_path):
    """Opening a database reads its schema revision without Alembic, and a fixed-n certification's checks (the
    largest radius its n can give) need no scipy: a submit pays for torch and little else."""
    url = f"sqlite:///{tmp_path / 'dsq.db'}"
    engine = open_database(url)
    with session_scope(engine) as session:
        train = TrainSpec(dataset="digits", target="classifier", arch="small_cnn", objective="standard", sigma=0.0)
        repo.create_job(session, kind="train", spec=train.to_dict(), seed=0, total=1)
    engine.dispose()
    done = subprocess.run([sys.executable, "-c", BLOCKED, "--db", url, "submit", "certify", "--dataset", "digits",
                           "--classifier", "job:1", "--sigma", "0.25", "--n", "1000"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "DSQ_HOME": str(tmp_path), "DSQ_WORKER_AUTOSTART": "0",
                               "DSQ_TEST_REFUSED": "alembic,scipy,statsmodels,ray"})
    assert done.returncode == 0 and done.stdout.split() == ["job", "2"], done.stderr
    assert "certifies radius 0.6158 at most" in done.stderr
