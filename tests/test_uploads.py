"""Files given by path at submit travel through the artifact store (dsq.uploads): folders bundled the same way at
every submit, uploaded once, fetched and hash-checked where the job runs, refused when the bytes were swapped."""

import os
import time
from pathlib import Path

import boto3
import pytest
import torch

from dsq import artifacts, jobs, uploads
from dsq.db import repo
from dsq.db.session import open_database, session_scope
from dsq.errors import ArtifactStoreError, CheckpointError
from dsq.kinds.certify import CertifySpec
from dsq.settings import Settings
from tests.test_artifacts import s3  # noqa: F401 - the module's moto server

BUCKET = "s3://dsq-test/uploads"


def image_folder(folder):
    """Two classes of two tiny 'images' (bytes suffice: nothing here decodes them) and an empty class folder."""
    for name in ("cat", "dog"):
        (folder / name).mkdir(parents=True)
        for k in range(2):
            (folder / name / f"{k}.png").write_bytes(f"{name}-{k}".encode() * 100)
    (folder / "fox").mkdir()
    return folder


def s3_settings(home, endpoint) -> Settings:
    return Settings(database_url=f"sqlite:///{home / 'dsq.db'}", home=home, artifacts_url=BUCKET,
                    s3_endpoint_url=endpoint)


def submitted(tmp_path):
    """A certify spec naming a model file and a folder dataset, both under ``tmp_path/user``."""
    user = tmp_path / "user"
    folder = image_folder(user / "pets")
    model = user / "model.pt"
    model.write_bytes(b"a model's bytes" * 50)
    return CertifySpec(dataset=f"folder:{folder}", classifier=str(model), sigma=0.25, n0=10, n=100), folder, model


def keys(endpoint) -> list[str]:
    listed = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket="dsq-test", Prefix="uploads/")
    return sorted(item["Key"] for item in listed.get("Contents", []))


def test_a_folder_bundles_to_the_same_bytes_whatever_its_times_and_to_others_when_a_file_changes(tmp_path):
    folder = image_folder(tmp_path / "pets")
    uploads.bundle(folder, tmp_path / "one.tar")
    later = time.time() + 1000
    for path in folder.rglob("*"):
        os.utime(path, (later, later))
    files, size = uploads.bundle(folder, tmp_path / "two.tar")
    assert (files, size) == (4, 4 * 500)
    assert artifacts.file_sha256(tmp_path / "one.tar") == artifacts.file_sha256(tmp_path / "two.tar")
    (folder / "fox" / "0.png").write_bytes(b"a fox")
    uploads.bundle(folder, tmp_path / "three.tar")
    assert artifacts.file_sha256(tmp_path / "three.tar") != artifacts.file_sha256(tmp_path / "one.tar")


def test_uploads_are_content_addressed_so_a_second_submit_uploads_nothing_and_says_so(s3, tmp_path):  # noqa: F811
    spec, folder, model = submitted(tmp_path)
    settings = s3_settings(tmp_path / "home", s3)
    said = []
    first = uploads.upload(spec, settings, said.append)
    assert set(first.uploads) == {str(model), str(folder)} and first.classifier == str(model)  # paths as given
    assert said == [f"uploading {model}: 750 bytes", f"uploading folder {folder}: 4 files, 2.0 kB"]
    stored = keys(s3)
    assert len(stored) == 2 and all(first.uploads[p]["location"].endswith(".pt") for p in first.uploads)
    said.clear()
    assert uploads.upload(spec, settings, said.append) == first
    assert said == [f"{model}: 750 bytes: already in the artifact store, nothing to upload",
                    f"folder {folder}: 4 files, 2.0 kB: already in the artifact store, nothing to upload"]
    assert keys(s3) == stored


def test_show_lists_each_upload_on_its_own_line(sqlite_url):
    from datetime import datetime, timedelta, timezone

    from dsq import views

    copies = {"/u/model.pt": {"location": "s3://b/e2e/aa.pt", "sha256": "a" * 64},
              "/u/pets\x1b[2J": {"location": "s3://b/e2e/bb.pt", "sha256": "b" * 64}}
    engine = open_database(sqlite_url)
    with session_scope(engine) as session:
        job = repo.create_job(session, kind="certify", spec={"sigma": 0.25, "uploads": copies}, seed=0)
        lines = views.show(session, job, datetime.now(timezone.utc), timedelta(seconds=60))
    engine.dispose()
    at = lines.index("  uploads (where the job reads them):")
    assert lines[at + 1:at + 3] == [f"    /u/model.pt: s3://b/e2e/aa.pt (sha256 {'a' * 12})",
                                    f"    /u/pets\\x1b[2J: s3://b/e2e/bb.pt (sha256 {'b' * 12})"]
    assert "  sigma = 0.25" in lines and not any("uploads =" in line for line in lines)


def test_a_local_store_uploads_nothing(tmp_path):
    spec, _, _ = submitted(tmp_path)
    settings = Settings(database_url="sqlite://", home=tmp_path / "home")
    assert uploads.upload(spec, settings, print) is spec
    assert not (tmp_path / "home" / "artifacts").exists()


def test_where_the_paths_are_gone_the_job_reads_the_store_copies(s3, tmp_path):  # noqa: F811
    spec, folder, model = submitted(tmp_path)
    spec = uploads.upload(spec, s3_settings(tmp_path / "home", s3))
    spec = CertifySpec(**{**spec.to_dict(), "models": {str(model): {"files": {str(model): spec.uploads[str(model)][
        "sha256"]}}}})
    (tmp_path / "user").rename(tmp_path / "gone")
    node = s3_settings(tmp_path / "node", s3)  # another machine: its own home and cache
    data = uploads.data_spec(node, spec)
    unpacked = data.dataset.removeprefix("folder:")
    assert unpacked.startswith(str(tmp_path / "node" / "cache" / "uploads"))
    assert sorted(p.relative_to(unpacked).as_posix() for p in Path(unpacked).rglob("*")) == [
        "cat", "cat/0.png", "cat/1.png", "dog", "dog/0.png", "dog/1.png", "fox"]
    assert spec.dataset == f"folder:{folder}"  # the job's own spec keeps the paths as given
    source = {"reference": str(model), "location": str(model), "sha256": None,
              "options": spec.models[str(model)], "uploads": uploads.model_uploads(spec.uploads, str(model), None)}
    local = uploads.local_source(node, source)
    assert local["reference"] == local["location"] != str(model)
    assert open(local["location"], "rb").read() == b"a model's bytes" * 50
    assert list(local["options"]["files"]) == [local["location"]]  # the pin now checks the fetched copy


def test_a_diffusers_folder_travels_and_loads_from_its_unpacked_copy(s3, tmp_path):  # noqa: F811
    from dsq import references, usermodels
    from tests.test_diffusion import tiny_pipeline

    folder = tmp_path / "user" / "ddpm"
    tiny_pipeline(folder)
    reference = f"diffusers:{folder}"
    spec = usermodels.pin(CertifySpec(dataset="digits", classifier="job:1", denoiser=reference, sigma=0.25,
                                      n0=10, n=100))
    spec = uploads.upload(spec, s3_settings(tmp_path / "home", s3))
    assert list(spec.uploads) == [str(folder)] and spec.denoiser == reference  # the spec keeps the path as given
    expected = references.load_source(s3_settings(tmp_path / "home", s3),
                                      references.source(None, reference, spec.models[reference], sigma=0.25),
                                      "denoiser")
    (tmp_path / "user").rename(tmp_path / "gone")
    node = s3_settings(tmp_path / "node", s3)
    source = references.source(None, reference, spec.models[reference], sigma=0.25, uploads=spec.uploads)
    local = uploads.local_source(node, source)
    unpacked = local["reference"].removeprefix("diffusers:")
    assert unpacked.startswith(str(tmp_path / "node" / "cache" / "uploads"))
    assert all(path.startswith(unpacked) for path in local["options"]["files"])  # the pins check the copies
    loaded = references.load_source(node, source, "denoiser")
    y = torch.rand(2, 1, 8, 8)
    assert torch.equal(loaded(y), expected(y))


def test_bytes_swapped_in_the_store_are_refused_when_fetched(s3, tmp_path):  # noqa: F811
    spec, folder, _ = submitted(tmp_path)
    spec = uploads.upload(spec, s3_settings(tmp_path / "home", s3))
    entry = spec.uploads[str(folder)]
    bucket, key = artifacts.split_s3(entry["location"])
    boto3.client("s3", endpoint_url=s3).put_object(Bucket=bucket, Key=key, Body=b"another folder")
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        uploads.data_spec(s3_settings(tmp_path / "node", s3), spec)
    assert not (tmp_path / "node" / "cache" / "uploads").exists()


def test_a_failed_upload_queues_nothing(s3, tmp_path, opens_database):  # noqa: F811
    import torch

    user = tmp_path / "user"
    user.mkdir()
    model = user / "model.pt"
    torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))), model)
    spec = CertifySpec(dataset="digits", classifier=str(model), sigma=0.25, n0=10, n=100, max_images=1)
    home = tmp_path / "home"
    settings = Settings(database_url=f"sqlite:///{home / 'dsq.db'}", home=home, artifacts_url="s3://no-such-bucket/x",
                        s3_endpoint_url=s3)
    engine = open_database(settings.database_url)
    try:
        with pytest.raises(ArtifactStoreError, match="cannot use artifact s3://no-such-bucket"):
            with session_scope(engine) as session:
                jobs.submit(session, spec, settings)
        with session_scope(engine) as session:
            assert repo.list_jobs(session) == []
            job = jobs.submit(session, spec, settings, upload=False)  # --no-upload: the path as given
            assert "uploads" not in job.spec or job.spec["uploads"] == {}
    finally:
        engine.dispose()


def tiny_folder(folder):
    """Two classes of one 8x8 RGB image each."""
    from PIL import Image

    for label, name in enumerate(("cat", "dog")):
        (folder / name).mkdir(parents=True)
        pixels = bytes([40, 40, 40]) * 64
        Image.frombytes("RGB", (8, 8), pixels[:label * 3] + b"\xc8" + pixels[label * 3 + 1:]).save(
            folder / name / "0.png")
    return folder


@pytest.mark.e2e
def test_a_node_that_never_saw_the_submitters_paths_certifies_a_users_model_and_folder(s3, tmp_path,  # noqa: F811
                                                                                       starts_processes):
    """A CPU-less head and one worker node (`ray start`ed, S3 credentials in their environment); the user's
    TorchScript model and image folder are submitted, then moved away: the job runs from the store's copies."""
    import shutil
    import tempfile

    import torch

    from tests.test_artifacts import CREDENTIALS
    from tests.test_faults import dsq, join_node, node_logs, start_head, stop

    user = tmp_path / "user"
    folder = tiny_folder(user / "pets")
    torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64, 2))),
                   user / "model.pt")
    temp = Path(tempfile.mkdtemp(prefix="dsq-up-"))  # short: Ray's socket paths have a length limit
    head, address = start_head(temp, CREDENTIALS)
    nodes = [head]
    try:
        nodes.append(join_node(address, temp, "--num-cpus=2", lambda found: len(found) >= 2, CREDENTIALS)[0])
        database = f"sqlite:///{tmp_path / 'dsq.db'}"
        shared = {"DSQ_DATABASE_URL": database, "DSQ_ARTIFACTS": "s3://dsq-test/e2e", "DSQ_S3_ENDPOINT_URL": s3,
                  "RAY_ADDRESS": address, "DSQ_WORKER_AUTOSTART": "0", **CREDENTIALS}
        out = dsq(shared | {"DSQ_HOME": str(tmp_path / "submitter")}, "submit", "certify",
                  "--dataset", f"folder:{folder}", "--classifier", user / "model.pt", "--sigma", "0.25",
                  "--n0", "10", "--n", "100", "--batch-size", "50", "--workers", "1", "--previews", "0")
        assert out.returncode == 0 and out.stdout.split() == ["job", "1"], out.stderr
        assert f"uploading folder {folder}: 2 files" in out.stderr, out.stderr
        user.rename(tmp_path / "moved")  # the only copies now are in S3
        node_home = tmp_path / "node"  # the worker's own home: its cache starts empty
        out = dsq(shared | {"DSQ_HOME": str(node_home)}, "worker", "--drain", timeout=600)
        assert out.returncode == 0, out.stderr + node_logs(temp)
        engine = open_database(database)
        try:
            with session_scope(engine) as session:
                job = repo.get_job(session, 1)
                assert job.status == "succeeded", (job.error, [line.message for line in repo.logs_for_job(session, 1)])
                assert len(repo.results_for_job(session, 1)) == 2
                assert job.spec["dataset"] == f"folder:{folder}"  # said as given
                sha = job.spec["uploads"][str(user / "model.pt")]["sha256"]
        finally:
            engine.dispose()
        assert (node_home / "cache" / "artifacts" / f"{sha}.pt").is_file()  # the model came from the store
        assert len(list((node_home / "cache" / "uploads").iterdir())) == 1  # and so did the folder
    finally:
        stop(*reversed(nodes))
        shutil.rmtree(temp, ignore_errors=True)
