"""A client that joins a cluster of other versions is refused in one line (exit 2).

A real mismatch cannot be made here: this machine has one Python, one Ray and one dsq. So the comparison and the
line are tested on given versions, Ray's own refusal on the text Ray's own check raises (``check_version_info``
with a cluster's metadata of other versions), and the task that reads the cluster's versions on the session's Ray,
where they match.
"""

import sys

import pytest
import ray
from typer.testing import CliRunner

import dsq
from dsq.errors import VersionMismatch
from workers import resources

MINE = {"ray": ray.__version__, "python": "%d.%d" % sys.version_info[:2], "dsq": dsq.__version__}


def ray_refusal() -> RuntimeError:
    """What ray.init raises on a cluster started with Ray 2.59.0 and Python 3.10.12 (Ray's own words)."""
    from ray._private.utils import check_version_info

    with pytest.raises(RuntimeError) as refused:
        check_version_info({"ray_version": "2.59.0", "python_version": "3.10.12"}, "node 10.0.0.5",
                           python_version_match_level="minor")
    return refused.value


def test_versions_that_differ_are_said_in_one_line():
    assert resources.mismatch_line(dict(MINE), MINE) is None
    assert resources.mismatch_line({"ray": MINE["ray"], "python": MINE["python"]}, MINE) is None  # dsq unknown
    older = {**MINE, "dsq": "0.0.9"}
    assert resources.mismatch_line(older, MINE) == (
        f"the cluster runs Ray {MINE['ray']} / Python {MINE['python']} / dsq 0.0.9; this client runs "
        f"Ray {MINE['ray']} / Python {MINE['python']} / dsq {MINE['dsq']}: use the same versions on both sides")
    assert resources.mismatch_line({**MINE, "python": "3.10"}, MINE).startswith(
        f"the cluster runs Ray {MINE['ray']} / Python 3.10 / dsq")


def test_rays_own_version_refusal_becomes_one_line(monkeypatch):
    error = ray_refusal()
    assert str(error).count("\n") > 3  # Ray's own: a paragraph
    theirs, mine = resources.ray_mismatch(error)
    assert theirs == {"ray": "2.59.0", "python": "3.10.12"} and mine["dsq"] == dsq.__version__
    assert resources.ray_mismatch(RuntimeError("Version mismatch: something else")) is None
    assert resources.ray_mismatch(ConnectionError("Ray: 1 Python: 2")) is None

    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(resources, "check_reachable", lambda address: None)
    monkeypatch.setattr(resources.ray, "is_initialized", lambda: False)  # the session's Ray may run in this process
    monkeypatch.setattr(resources.ray, "init", refuse)
    with pytest.raises(VersionMismatch) as refused:
        resources.connect("10.0.0.5:6379")
    line = str(refused.value)
    assert "\n" not in line and line.startswith("the cluster runs Ray 2.59.0 / Python 3.10.12; this client runs Ray ")
    assert line.endswith(f"/ dsq {dsq.__version__}: use the same versions on both sides")


def test_dsq_cluster_on_a_cluster_of_other_versions_exits_2_with_one_line(monkeypatch, tmp_path):
    from cli.main import app

    error = ray_refusal()

    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(resources, "check_reachable", lambda address: None)
    monkeypatch.setattr(resources.ray, "is_initialized", lambda: False)  # the session's Ray may run in this process
    monkeypatch.setattr(resources.ray, "init", refuse)
    out = CliRunner().invoke(app, ["cluster"], env={"RAY_ADDRESS": "10.0.0.5:6379", "DSQ_HOME": str(tmp_path)})
    assert out.exit_code == 2, out.output
    assert out.stderr.startswith("error: the cluster runs Ray 2.59.0 / Python 3.10.12;") and out.stderr.count("\n") == 1


@pytest.mark.usefixtures("ray_session")
def test_the_cluster_versions_are_read_by_a_task_on_its_head():
    assert ray.get(resources._versions_there.options(scheduling_strategy=resources.on_head_node()).remote(),
                   timeout=120) == MINE
    resources.check_versions(timeout=120)  # the same versions: nothing said, still connected
    assert ray.is_initialized()
