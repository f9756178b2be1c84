"""Your own models: TorchScript files, torchvision:NAME and package.module:function, with weights and
normalization, loaded the same way by the job check, the samplers and the trainer (real Ray, real SQLite)."""

import os
import re
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from typer.testing import CliRunner

from cli.main import app
from dsq import artifacts, jobs, kinds, references, usermodels
from dsq.db import repo
from dsq.db.session import open_database, session_scope
from dsq.errors import CheckpointError, InvalidArgument
from dsq.settings import Settings
from tests.test_jobs import certify_spec, rows_of, run, run_job, submit
from dsq.kinds.certify import CertifySpec
from dsq.kinds.train import TrainSpec

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_session):
    """A trained digits classifier (job 1) and the same net exported as TorchScript and as a state dict."""
    home = tmp_path_factory.mktemp("byom-home")
    config = Settings(database_url=f"sqlite:///{home / 'dsq.db'}", home=home)
    engine = open_database(config.database_url)
    f = run(config, engine, TrainSpec(dataset="digits", target="classifier", arch="small_cnn",
                                            objective="gaussian", sigma=0.25, epochs=2, batch_size=64))
    with session_scope(engine) as session:
        whole = references.load(session, f"job:{f}", config, "classifier")
    normalize, net = whole[0], whole[1]
    scripted = home / "net.pt"
    torch.jit.save(torch.jit.script(net), scripted)
    weights = home / "net.weights.pt"
    torch.save(net.state_dict(), weights)
    normalization = {"mean": normalize.means.tolist(), "std": normalize.sds.tolist()}
    yield config, engine, f, str(scripted), str(weights), normalization
    engine.dispose()


def factory_module(folder: Path) -> str:
    """A user's own module whose function builds dsq's small_cnn net without its normalization."""
    (folder / "my_nets.py").write_text(textwrap.dedent("""
        from dsq.classifiers import build_classifier

        def small(classes=10, width=32):
            return build_classifier("small_cnn", num_classes=classes, in_channels=1, mean=[0.0], std=[1.0],
                                    width=width)[1]

        def not_a_model():
            return 42
    """))
    return str(folder)


def test_reference_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model:best").write_bytes(b"")  # an existing file is a file, whatever its name looks like
    assert usermodels.form("model:best") == "file" and usermodels.form("model:other") == "factory"
    assert usermodels.form("job:3") == "job"
    assert usermodels.form("torchvision:resnet18") == "torchvision"
    assert usermodels.form("my_pkg.nets:build") == "factory"
    for path in ("model.pt", "/abs/model.pt", "dir/my.nets:x.pt", "C:x y"):
        assert usermodels.form(path) == "file"


@pytest.mark.parametrize("reference,options,role,message", [
    ("job:1", {"mean": [0.5], "std": [0.5]}, "classifier", "carries its architecture"),
    ("torchvision:resnet18", {}, "classifier", "needs its weights"),
    ("pkg.mod:make", {"mean": [0.5]}, "classifier", "give both --mean and --std"),
    ("pkg.mod:make", {"mean": [0.5, 0.5], "std": [0.5]}, "classifier", "one value per channel"),
    ("pkg.mod:make", {"mean": [0.5], "std": [0.0]}, "classifier", "must be > 0"),
    ("pkg.mod:make", {"mean": [float("nan")], "std": [1.0]}, "classifier", "finite numbers"),
    ("pkg.mod:make", {"mean": [0.5], "std": [0.5]}, "denoiser", "a denoiser works in [0, 1]"),
    ("pkg.mod:make", {"args": [1, 2]}, "classifier", "JSON object"),
    ("pkg.mod:make", {"colour": "red"}, "classifier", "keys among"),
    ("model.pt", {"weights": "w.pt"}, "classifier", "holds its own weights"),
])
def test_bad_options_are_refused(reference, options, role, message):
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        usermodels.check_options(reference, options, role)


def test_specs_check_their_models():
    base = dict(dataset="digits", sigma=0.25, n=1000)
    with pytest.raises(InvalidArgument, match="does not use"):
        CertifySpec(classifier="job:1", models={"other:make": {}}, **base)
    with pytest.raises(InvalidArgument, match="needs its weights"):
        CertifySpec(classifier="torchvision:resnet18", **base)  # an entry is implied, and checked
    with pytest.raises(InvalidArgument, match="--init must be a dsq checkpoint"):
        TrainSpec(dataset="digits", target="denoiser", arch="dncnn", objective="stab_mse", sigma=0.25,
                        classifier="job:1", init="torchvision:resnet18")
    spec = CertifySpec(classifier="pkg.mod:make", models={"pkg.mod:make": {"args": {"k": 1}}}, **base)
    assert kinds.from_dict(spec.to_dict()) == spec
    assert spec.models == {"pkg.mod:make": {"weights": None, "args": {"k": 1}}}
    old = CertifySpec(classifier="job:1", **base).to_dict()
    del old["models"]  # a spec stored before models existed
    assert kinds.from_dict(old).models == {}


def test_torchvision_model_with_the_users_weights(tmp_path):
    torch.manual_seed(0)
    reference_net = torchvision.models.resnet18(num_classes=7).eval()
    weights = tmp_path / "resnet18.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference_net.state_dict().items()}}, weights)
    model = usermodels.load("torchvision:resnet18", None, {"weights": str(weights)}, "classifier")
    x = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor(usermodels.IMAGENET_NORMALIZATION["mean"]), torch.tensor([0.229, 0.224, 0.225])
    with torch.no_grad():  # 7 classes read from the weights; ImageNet's normalization by default
        expected = reference_net((x - mean[:, None, None]) / std[:, None, None])
        assert torch.allclose(model(x), expected, atol=1e-5)
        plain = usermodels.load("torchvision:resnet18", None, {"weights": str(weights), "mean": [0, 0, 0],
                                                               "std": [1, 1, 1]}, "classifier")
        assert torch.allclose(plain(x), reference_net(x), atol=1e-5)
    with pytest.raises(CheckpointError, match="do not fit torchvision:resnet34"):
        usermodels.load("torchvision:resnet34", None, {"weights": str(weights)}, "classifier")
    with pytest.raises(InvalidArgument, match="torchvision has no model 'resnet19'"):
        usermodels.load("torchvision:resnet19", None, {"weights": str(weights)}, "classifier")
    pickled = tmp_path / "pickled.pt"
    torch.save(reference_net, pickled)  # a whole pickled model: refused, never unpickled
    with pytest.raises(CheckpointError, match="holds Python objects"):
        usermodels.load("torchvision:resnet18", None, {"weights": str(pickled)}, "classifier")


def test_factory_models_import_only_what_is_named(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(factory_module(tmp_path))
    model = usermodels.load("my_nets:small", None, {"args": {"classes": 4, "width": 8}}, "classifier")
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 4) and not any(p.requires_grad for p in model.parameters())
    for reference, message in [("my_nets:not_a_model", "returned int, not a torch.nn.Module"),
                               ("my_nets:missing", "has no function missing"),
                               ("no_such_module_here:make", "cannot import no_such_module_here")]:
        with pytest.raises(InvalidArgument, match=message):
            usermodels.load(reference, None, {}, "classifier")
    with pytest.raises(InvalidArgument, match="unexpected keyword argument"):
        usermodels.load("my_nets:small", None, {"args": {"colour": 1}}, "classifier")


def test_the_same_net_as_checkpoint_torchscript_and_factory_certifies_identically(world, tmp_path, monkeypatch):
    config, engine, f, scripted, weights, normalization = world
    monkeypatch.syspath_prepend(factory_module(tmp_path))
    as_checkpoint = run(config, engine, certify_spec(f, max_images=4))
    as_script = run(config, engine, certify_spec(f, max_images=4, classifier=scripted,
                                                 models={scripted: normalization}))
    as_factory = run(config, engine, certify_spec(f, max_images=4, classifier="my_nets:small",
                                                  models={"my_nets:small": {"weights": weights, **normalization}}))
    assert rows_of(engine, as_checkpoint) == rows_of(engine, as_script) == rows_of(engine, as_factory)
    without = run(config, engine, certify_spec(f, max_images=4, classifier=scripted))  # normalization forgotten
    assert rows_of(engine, without) != rows_of(engine, as_checkpoint)


def test_a_model_file_changed_after_submit_is_refused_when_the_job_runs(world, tmp_path, monkeypatch):
    config, engine, f, scripted, weights, normalization = world
    monkeypatch.syspath_prepend(factory_module(tmp_path))
    mine, my_weights = tmp_path / "mine.pt", tmp_path / "mine.weights.pt"
    mine.write_bytes(Path(scripted).read_bytes())
    my_weights.write_bytes(Path(weights).read_bytes())
    scripted_job = submit(config, engine, certify_spec(f, max_images=1, classifier=str(mine)))
    factory_job = submit(config, engine, certify_spec(f, max_images=1, classifier="my_nets:small",
                                                      models={"my_nets:small": {"weights": str(my_weights)}}))
    with session_scope(engine) as session:
        assert repo.get_job(session, scripted_job).spec["models"][str(mine)]["files"] == {
            str(mine): artifacts.file_sha256(mine)}
        code = repo.get_job(session, factory_job).spec["models"]["my_nets:small"]["code"]
        assert (Path(code) / "my_nets.py").is_file()  # where this process imported it from (maybe an earlier test's)
    torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))), mine)
    torch.save({k: v + 1 for k, v in torch.load(weights).items()}, my_weights)
    for job_id, path in ((scripted_job, mine), (factory_job, my_weights)):
        assert run_job(config, job_id) == "failed"
        with session_scope(engine) as session:
            error = repo.get_job(session, job_id).error
        assert f"{path} changed after the job was submitted" in error and "submit a new job" in error


def test_a_denoiser_trains_against_a_torchscript_classifier(world):
    config, engine, f, scripted, weights, normalization = world
    job_id = run(config, engine, TrainSpec(
        dataset="digits", target="denoiser", arch="dncnn", objective="clf", sigma=0.25, epochs=1, batch_size=64,
        arch_kwargs={"depth": 3, "width": 8}, classifier=scripted, models={scripted: normalization}))
    denoised = run(config, engine, certify_spec(f, max_images=2, denoiser=f"job:{job_id}", classifier=scripted,
                                                models={scripted: normalization}))
    assert len(rows_of(engine, denoised)) == 2


def test_bad_user_models_are_refused_at_submit_and_write_nothing(world, tmp_path):
    config, engine, f, scripted, weights, normalization = world
    with session_scope(engine) as session:
        before = len(repo.list_jobs(session, limit=1000))
        checkpoint = references.resolve(session, f"job:{f}", config)
    cases = [
        (certify_spec(f, classifier=checkpoint, models={checkpoint: normalization}), "carries its architecture"),
        (certify_spec(f, classifier="torchvision:resnet18", models={
            "torchvision:resnet18": {"weights": str(tmp_path / "none.pt")}}), "weights file not found"),
        (certify_spec(f, classifier="torchvision:resnet18", models={"torchvision:resnet18": {"weights": weights}}),
         "do not fit torchvision:resnet18"),
    ]
    for spec, message in cases:
        with pytest.raises((InvalidArgument, CheckpointError), match=message):
            with session_scope(engine) as session:
                jobs.submit(session, spec, config)
    with session_scope(engine) as session:
        assert len(repo.list_jobs(session, limit=1000)) == before


def test_cli_options_for_your_own_model(world, tmp_path):
    config, engine, f, scripted, weights, normalization = world
    home = tmp_path / "home"

    def dsq(*args):
        return CliRunner().invoke(app, ["--db", f"sqlite:///{home / 'dsq.db'}", "submit", "certify", "--dataset",
                                        "digits", "--sigma", "0.25", "--n", "1000", *args],
                                  env={"DSQ_HOME": str(home), "DSQ_WORKER_AUTOSTART": "0"})

    for args, message in [
        (["--classifier", "job:1", "--mean", "0.5", "--std", "0.5"], "carries its architecture"),
        (["--classifier", scripted, "--mean", "0.5"], "give both --mean and --std"),
        (["--classifier", scripted, "--mean", "0.5", "--std", "x"], "--std must be comma-separated numbers"),
        (["--classifier", scripted, "--classifier-weights", weights], "holds its own weights"),
        (["--classifier", "torchvision:resnet18"], "needs its weights"),
        (["--classifier", "my.mod:make", "--classifier-args", "[1]"], "--classifier-args must be a JSON object"),
        (["--classifier", scripted, "--denoiser-weights", weights], "need --denoiser"),
    ]:
        out = dsq(*args)
        assert out.exit_code == 2 and out.stderr.count("\n") == 1 and message in out.stderr, (args, out.stderr)
    out = dsq("--classifier", os.path.relpath(scripted), "--mean", str(normalization["mean"][0]), "--std",
              str(normalization["std"][0]), "--max-images", "2")
    assert out.exit_code == 0, out.stderr
    with session_scope(open_database(f"sqlite:///{home / 'dsq.db'}")) as session:
        [job] = repo.list_jobs(session, limit=10)
        assert job.spec["classifier"] == scripted and set(job.spec["models"]) == {scripted}  # stored absolute


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Bring your own model", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return block


@pytest.mark.e2e
def test_the_readme_example_runs(tmp_path, joins_local_ray):
    """The README's "Bring your own model" commands, as written, from the repository root (their workers join the
    session's Ray: a local Ray's own start is tested elsewhere)."""
    env = {**os.environ, "DSQ_HOME": str(tmp_path / "home"), "DSQ_WORKER_IDLE_SECONDS": "5"}
    env.pop("PYTHONPATH", None)
    env.pop("DSQ_DATABASE_URL", None)
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_example()], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if "(job 1)" in line or "(job 2)" in line]
    assert len(rows) == 2 and rows[0].split("│")[2:] == rows[1].split("│")[2:], out.stdout  # the same radii
