"""The artifact store: a local directory and a real S3-compatible server (moto, in server mode, on 127.0.0.1)."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from dsq import artifacts
from dsq.db import repo
from dsq.db.session import open_database, session_scope
from dsq.errors import ArtifactStoreError, CheckpointError
from dsq.settings import Settings
from tests.conftest import NARROW, free_port

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3():
    """URL of a moto S3 server on loopback, with fake credentials in the environment for boto3."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port())
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    import boto3

    boto3.client("s3", endpoint_url=url).create_bucket(Bucket="dsq-test")
    yield url
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def blob(tmp_path, content=b"weights"):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    return path


def test_local_store_is_content_addressed_and_verifies(tmp_path):
    store = artifacts.open_store(None, home=tmp_path / "home")
    location, sha256 = store.put(blob(tmp_path))
    assert location == f"sha256/{sha256}.pt"  # relative to the store, not to where the store is today
    assert (tmp_path / "home" / "artifacts" / location).read_bytes() == b"weights"
    assert store.put(blob(tmp_path)) == (location, sha256)  # same bytes, same place
    assert store.fetch(location, sha256).read_bytes() == b"weights"
    (tmp_path / "home" / "artifacts" / location).write_bytes(b"tampered")
    with pytest.raises(CheckpointError, match=r"artifact .* sha256 mismatch"):
        store.fetch(location, sha256)


def test_a_home_copied_elsewhere_keeps_its_artifacts(tmp_path):
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    location, sha256 = artifacts.store_for(Settings(database_url="sqlite://", home=home_a)).put(blob(tmp_path))
    shutil.copytree(home_a, home_b)
    shutil.rmtree(home_a)
    fetched = artifacts.fetch(Settings(database_url="sqlite://", home=home_b), location, sha256)
    assert fetched.read_bytes() == b"weights" and fetched.is_relative_to(home_b)


def test_absolute_locations_of_older_versions_still_load(tmp_path):
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    location, sha256 = artifacts.store_for(Settings(database_url="sqlite://", home=home_a)).put(blob(tmp_path))
    old_location = str(home_a / "artifacts" / location)  # what dsq recorded before locations were relative
    assert artifacts.fetch(Settings(database_url="sqlite://", home=home_a), old_location, sha256).read_bytes() \
        == b"weights"
    shutil.copytree(home_a, home_b)
    shutil.rmtree(home_a)
    fetched = artifacts.fetch(Settings(database_url="sqlite://", home=home_b), old_location, sha256)
    assert fetched.read_bytes() == b"weights" and fetched.is_relative_to(home_b)  # the same bytes, where they are now


def test_a_store_folder_outside_the_home_is_relative_to_itself(tmp_path):
    settings = Settings(database_url="sqlite://", home=tmp_path / "home", artifacts_url=str(tmp_path / "store"))
    location, sha256 = artifacts.store_for(settings).put(blob(tmp_path))
    shutil.move(tmp_path / "store", tmp_path / "restored")
    moved = Settings(database_url="sqlite://", home=tmp_path / "home", artifacts_url=str(tmp_path / "restored"))
    assert artifacts.fetch(moved, location, sha256).read_bytes() == b"weights"
    with pytest.raises(CheckpointError, match=r"artifact sha256/.* not found in the artifact store"):
        artifacts.fetch(settings, location, sha256)
    with pytest.raises(ArtifactStoreError, match="leaves the store"):
        artifacts.fetch(moved, "../home/x.pt", sha256)


def run_without_file_access(code: str, *paths) -> subprocess.CompletedProcess:
    """Run Python ``code`` (argv: paths) with root's power to ignore file modes dropped (a root test runner)."""
    capabilities = "-dac_override,-dac_read_search"
    command = [sys.executable, "-c", textwrap.dedent(code), *map(str, paths)]
    if os.geteuid() == 0:
        command = ["setpriv", f"--bounding-set={capabilities}", f"--inh-caps={capabilities}", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


PUT_AND_FETCH = """
    import sys
    from dsq import artifacts
    from dsq.errors import DsqError
    store = artifacts.open_store(None, home=sys.argv[2])
    try:
        if sys.argv[1] == "put":
            store.put(sys.argv[3])
        else:
            store.fetch(sys.argv[3], sys.argv[4])
    except DsqError as error:
        print(type(error).__name__, error)
"""


@pytest.mark.e2e
def test_an_unreadable_checkpoint_is_one_line_when_stored(tmp_path):
    path = blob(tmp_path)
    path.chmod(0)
    done = run_without_file_access(PUT_AND_FETCH, "put", tmp_path / "home", path)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout == f"CheckpointError checkpoint {path} cannot be read: permission denied\n"


@pytest.mark.e2e
def test_an_unreadable_artifact_is_one_line_when_fetched(tmp_path):
    location, sha256 = artifacts.open_store(None, home=tmp_path / "home").put(blob(tmp_path))
    (tmp_path / "home" / "artifacts" / location).chmod(0)
    done = run_without_file_access(PUT_AND_FETCH, "fetch", tmp_path / "home", location, sha256)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout.startswith(f"ArtifactStoreError artifact {location} cannot be read")
    assert done.stdout.endswith("permission denied\n") and done.stdout.count("\n") == 1


def test_s3_store_put_fetch_cache_and_mismatch(s3, tmp_path):
    settings = Settings(database_url="sqlite://", home=tmp_path, artifacts_url="s3://dsq-test/runs",
                        s3_endpoint_url=s3)
    location, sha256 = artifacts.store_for(settings).put(blob(tmp_path))
    assert location == f"s3://dsq-test/runs/sha256/{sha256}.pt"
    local = artifacts.fetch(settings, location, sha256)
    assert local.read_bytes() == b"weights" and local.is_relative_to(tmp_path / "cache")
    local.write_bytes(b"corrupt cache")  # a bad cache entry is fetched again
    assert artifacts.fetch(settings, location, sha256).read_bytes() == b"weights"
    import boto3

    boto3.client("s3", endpoint_url=s3).put_object(Bucket="dsq-test", Key=location.split("/", 3)[3], Body=b"evil")
    local.unlink()
    with pytest.raises(CheckpointError, match=r"artifact s3://.* sha256 mismatch"):
        artifacts.fetch(settings, location, sha256)
    assert not local.exists()  # nothing half-written in the cache


def test_s3_without_access_is_one_line(s3, tmp_path):
    missing = artifacts.open_store("s3://no-such-bucket/x", home=tmp_path, endpoint_url=s3)
    with pytest.raises(ArtifactStoreError, match=r"^cannot use artifact s3://no-such-bucket/x: ") as info:
        missing.check()
    assert "\n" not in str(info.value)
    with pytest.raises(ArtifactStoreError, match="NoSuchBucket"):
        missing.put(blob(tmp_path))
    with pytest.raises(ArtifactStoreError, match="no-such-bucket"):
        missing.fetch("s3://no-such-bucket/x/a.pt", "0" * 64)


def test_keyed_files_are_replaced_read_back_and_removed_by_folder_in_both_stores(s3, tmp_path):
    """What a training's resumable checkpoints use: a file under a key, replaced in place, removed with its folder
    (``resume/job-1`` and not ``resume/job-12``)."""
    local = artifacts.open_store(None, home=tmp_path / "home")
    remote = artifacts.open_store("s3://dsq-test/keyed", home=tmp_path / "home", endpoint_url=s3)
    for store in (local, remote):
        assert store.get_at("resume/job-1/a.pt") is None
        store.put_at(blob(tmp_path, b"epoch 1"), "resume/job-1/a.pt")
        store.put_at(blob(tmp_path, b"epoch 2"), "resume/job-1/a.pt")
        store.put_at(blob(tmp_path, b"stale"), "resume/job-1/b.pt")
        store.put_at(blob(tmp_path, b"other job"), "resume/job-12/a.pt")
        assert store.get_at("resume/job-1/a.pt").read_bytes() == b"epoch 2"
        store.remove_under("resume/job-1")
        store.remove_under("resume/job-1")  # none left is fine
        assert store.get_at("resume/job-1/a.pt") is None and store.get_at("resume/job-1/b.pt") is None
        assert store.get_at("resume/job-12/a.pt").read_bytes() == b"other job"
        for bad in ("../a.pt", "/etc/a.pt", "resume/../../a.pt"):
            with pytest.raises(ArtifactStoreError, match="leaves the store"):
                store.put_at(blob(tmp_path), bad)
    assert not list((tmp_path / "home" / "artifacts").rglob("*.part-*"))


def dsq(env, *args):
    return subprocess.run([sys.executable, "-m", "cli", *map(str, args)], env=os.environ | env,
                          capture_output=True, text=True, timeout=300)


TRAIN = ["submit", "train", "--dataset", "digits", "--target", "classifier", *NARROW,
         "--objective", "standard", "--sigma", "0", "--epochs", "1", "--wait"]


@pytest.mark.e2e
def test_training_through_s3_then_certify_verifies_the_hash(s3, tmp_path):
    # Not on the session's Ray (joins_local_ray): the trainer actor reads the credentials from its environment,
    # which a local Ray started by the `dsq` process passes on, and a Ray started before it does not.
    env = {"DSQ_HOME": str(tmp_path), "DSQ_ARTIFACTS": "s3://dsq-test/jobs", "DSQ_S3_ENDPOINT_URL": s3,
           "RAY_AUTH_MODE": "disabled", **CREDENTIALS}
    out = dsq(env, *TRAIN)
    assert out.returncode == 0, out.stderr
    engine = open_database(f"sqlite:///{tmp_path / 'dsq.db'}")
    with session_scope(engine) as session:
        [artifact] = repo.artifacts_for_job(session, 1)
        assert artifact.location.startswith("s3://dsq-test/jobs/sha256/")
        settings = Settings.from_env(env)
        assert artifacts.fetch(settings, artifact.location, artifact.sha256).is_file()
    import boto3

    listed = boto3.client("s3", endpoint_url=s3).list_objects_v2(Bucket="dsq-test", Prefix="jobs/")
    assert [item["Key"] for item in listed["Contents"]] == [artifact.location.split("/", 3)[3]]  # no resume/ left

    key = artifact.location.split("/", 3)[3]
    boto3.client("s3", endpoint_url=s3).put_object(Bucket="dsq-test", Key=key, Body=b"swapped")
    (tmp_path / "cache" / "artifacts" / f"{artifact.sha256}.pt").unlink()
    out = dsq(env, "submit", "certify", "--dataset", "digits", "--classifier", "job:1", "--sigma", "0.25",
              "--n0", "10", "--n", "50", "--max-images", "1")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "sha256 mismatch" in out.stderr and "Traceback" not in out.stderr
    with session_scope(engine) as session:
        assert [job.id for job in repo.list_jobs(session)] == [1]  # nothing half-written
    engine.dispose()


@pytest.mark.e2e
def test_training_into_an_inaccessible_bucket_is_refused_at_submit(s3, tmp_path):
    env = {"DSQ_HOME": str(tmp_path), "DSQ_ARTIFACTS": "s3://no-such-bucket/jobs", "DSQ_S3_ENDPOINT_URL": s3,
           "RAY_AUTH_MODE": "disabled", **CREDENTIALS}
    out = dsq(env, *TRAIN)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("error: cannot use artifact s3://no-such-bucket/jobs")
    engine = open_database(f"sqlite:///{tmp_path / 'dsq.db'}")
    with session_scope(engine) as session:
        assert repo.list_jobs(session) == []
    engine.dispose()
