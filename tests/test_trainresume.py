"""Resumable trainings: a training stopped after an epoch or within one, then resumed from its last resumable
state, ends with the weights of an uninterrupted run, bit for bit; a state that does not fit starts it over.

The unit tests drive ``training.train`` with states kept in memory (written and read back the way the store
does: ``torch.save``, then ``torch.load(weights_only=True)``); the db tests run a train job's own
``run_training`` against a real SQLite file and artifact folder.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch.utils.data import Subset

from dsq import artifacts, checkpoints, datasets, jobs, pipeline, trainstate, training
from dsq.db import repo
from dsq.db.session import open_database, session_scope
from dsq.kinds import train as train_kind
from dsq.kinds.train import TrainSpec

SMALL_UNET = {"block_out_channels": [16], "layers_per_block": 1, "norm_num_groups": 8}
SPECS = {  # every objective, and both targets; lr_step 1 makes the LR schedule part of what must resume
    "mse": dict(target="denoiser", arch="dncnn", objective="mse", sigma=0.25, arch_kwargs={"depth": 3, "width": 8}),
    "stab": dict(target="denoiser", arch="dncnn", objective="stab", sigma=0.25, arch_kwargs={"depth": 3, "width": 8},
                 classifier="f.pt"),
    "stab_mse": dict(target="denoiser", arch="dncnn", objective="stab_mse", sigma=0.25, init="mse.pt",
                     arch_kwargs={"depth": 3, "width": 8}, classifier="f.pt"),
    "diffusion": dict(target="denoiser", arch="unet", objective="diffusion", sigma=0.0, arch_kwargs=SMALL_UNET),
    "gaussian": dict(target="classifier", arch="small_cnn", objective="gaussian", sigma=0.25,
                     arch_kwargs={"width": 4}, optimizer="sgd", lr=0.05),
}


class Stopped(Exception):
    """Stands for the worker dying right after it stored a resumable state."""


@pytest.fixture(scope="module")
def digits():
    info = datasets.dataset_info("digits")
    return info, Subset(datasets.get_dataset("digits", "train"), range(64)), \
        Subset(datasets.get_dataset("digits", "test"), range(64))


@pytest.fixture(scope="module")
def models(digits):
    """A frozen classifier and an MSE denoiser to fine-tune, built under fixed seeds."""
    info = digits[0]
    with training.private_cpu_rng(1):
        from dsq.classifiers import build_classifier
        from dsq.denoisers import build_denoiser

        return build_classifier("small_cnn", num_classes=10, in_channels=1, mean=info.mean, std=info.std,
                                width=4), build_denoiser("dncnn", 1, depth=3, width=8)


def spec_of(name: str, **changes) -> TrainSpec:
    return TrainSpec(**{"dataset": "digits", "epochs": 2, "batch_size": 16, "lr_step": 1, **SPECS[name], **changes})


def stored(state: dict):
    """A state as the store gives it back."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)


class Keeper(training.Checkpointing):
    """Keeps the states (``last``, ``states``); raises Stopped once ``stop(state)`` says so; records what the
    training said."""

    def __init__(self, saved=None, stop=lambda state: False, every_seconds: float = 300.0):
        super().__init__(saved=saved, save=self._save, say=self._say, every_seconds=every_seconds)
        self.last, self.states, self.lines, self.stop = None, [], [], stop

    def _save(self, state):
        self.last = stored(state)
        self.states.append(self.last)
        if self.stop(state):
            raise Stopped

    def _say(self, line):
        self.lines.append(line)


def run(name, digits, models, spec=None, keeper=None):
    info, train_set, test_set = digits
    spec = spec or spec_of(name)
    classifier, init = models
    frozen = [classifier] if spec.classifiers else []
    return training.train(spec, train_set, test_set, info, classifiers=frozen,
                          init=init if spec.init else None, checkpointing=keeper)


def same_weights(a, b) -> bool:
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def without_seconds(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "seconds"}


@pytest.mark.parametrize("name", list(SPECS))
def test_a_training_stopped_after_an_epoch_resumes_to_the_same_weights(digits, models, name):
    straight, metrics = run(name, digits, models)
    first = Keeper(stop=lambda state: state["epoch"] == 1)
    with pytest.raises(Stopped):
        run(name, digits, models, keeper=first)
    assert (first.last["epoch"], first.last["step"], len(first.last["losses"])) == (1, 0, 1)
    second = Keeper(saved=first.last)
    resumed, metrics_again = run(name, digits, models, keeper=second)
    assert second.lines == ["resuming at epoch 2 of 2"]
    assert same_weights(resumed, straight)
    assert without_seconds(metrics_again) == without_seconds(metrics)
    assert second.last["epoch"] == 2  # and the last epoch's end was stored too


def test_a_training_stopped_within_an_epoch_resumes_to_the_same_weights(digits, models):
    """every_seconds=0: a state after every batch; stopped after batch 2 of epoch 2, where the noise
    generator and torch's RNG are mid-stream."""
    straight, metrics = run("mse", digits, models)
    first = Keeper(stop=lambda state: (state["epoch"], state["step"]) == (1, 2), every_seconds=0)
    with pytest.raises(Stopped):
        run("mse", digits, models, keeper=first)
    assert first.last["rng"]["noise"] is not None and "numpy" in first.last["rng"]
    second = Keeper(saved=first.last)
    resumed, metrics_again = run("mse", digits, models, keeper=second)
    assert second.lines == ["resuming at epoch 2 of 2, batch 3"]
    assert same_weights(resumed, straight)
    assert without_seconds(metrics_again) == without_seconds(metrics)


def test_a_state_stored_after_the_last_epoch_only_evaluates(digits, models):
    straight, metrics = run("mse", digits, models)
    first = Keeper()
    run("mse", digits, models, keeper=first)
    second = Keeper(saved=first.last, stop=lambda state: True)  # no epoch may run: it would raise Stopped
    resumed, metrics_again = run("mse", digits, models, keeper=second)
    assert second.lines == ["resuming after all 2 epochs: evaluating and storing the model"]
    assert same_weights(resumed, straight) and without_seconds(metrics_again) == without_seconds(metrics)


def misfits(digits, models) -> dict:
    """Resumable states that do not fit an mse dncnn depth 3 width 8 training of 2 epochs."""
    other = Keeper(stop=lambda state: state["epoch"] == 1)
    with pytest.raises(Stopped):
        run("mse", digits, models, spec=spec_of("mse", arch_kwargs={"depth": 3, "width": 4}), keeper=other)
    good = Keeper(stop=lambda state: state["epoch"] == 1)
    with pytest.raises(Stopped):
        run("mse", digits, models, keeper=good)
    moments = {**good.last["optimizer"]["state"][0], "exp_avg": torch.zeros(3)}
    return {
        "other shapes": other.last,
        "not a state": {"weights": torch.zeros(2)},
        "missing keys": {k: v for k, v in good.last.items() if k != "scheduler"},
        "other epochs": {**good.last, "epochs": 5},
        "optimizer of other shapes": {**good.last, "optimizer": {**good.last["optimizer"],
                                                                 "state": {**good.last["optimizer"]["state"],
                                                                           0: moments}}},
    }


def test_a_state_that_does_not_fit_starts_the_training_over(digits, models):
    straight, metrics = run("mse", digits, models)
    said = {}
    for what, state in misfits(digits, models).items():
        keeper = Keeper(saved=state)
        again, metrics_again = run("mse", digits, models, keeper=keeper)
        assert len(keeper.lines) == 1 and keeper.lines[0].startswith("the resumable checkpoint does not fit"), what
        assert keeper.lines[0].endswith("; starting over from epoch 1") and "\n" not in keeper.lines[0], what
        assert same_weights(again, straight), what
        assert without_seconds(metrics_again) == without_seconds(metrics), what
        said[what] = keeper.lines[0]
    assert "shape mismatches" in said["other shapes"] and "lacks 'scheduler'" in said["missing keys"]


# ------------------------------------------------------------------------------ a train job's own run


@pytest.fixture
def home(tmp_path, opens_database):
    """Settings (a state at every epoch's end only) and a fresh SQLite database."""
    from dsq.settings import Settings

    config = Settings(database_url=f"sqlite:///{tmp_path / 'dsq.db'}", home=tmp_path / "home")
    engine = open_database(config.database_url)
    yield config, engine
    engine.dispose()


JOB_SPEC = TrainSpec(dataset="digits", target="denoiser", arch="dncnn", objective="mse", sigma=0.25, epochs=2,
                     batch_size=256, lr_step=1, arch_kwargs={"depth": 3, "width": 8})


@pytest.fixture(scope="module")
def uninterrupted():
    """(the weights JOB_SPEC trains uninterrupted on the data its job reads, the state stored after epoch 1)."""
    info, train_set, test_set, _ = pipeline.train_data(JOB_SPEC, None, [])
    keeper = Keeper()
    model, _ = training.train(JOB_SPEC, train_set, test_set, info, checkpointing=keeper)
    return model.state_dict(), keeper.states[0]


def submitted(config, engine, spec=JOB_SPEC) -> int:
    with session_scope(engine) as session:
        return jobs.submit(session, spec, config).id


def weights_and_logs(config, engine, job_id):
    """(the state dict of the model the job stored, its log lines, its artifact rows' locations)."""
    with session_scope(engine) as session:
        rows = repo.artifacts_for_job(session, job_id)
        lines = [log.message for log in repo.logs_for_job(session, job_id)]
        locations = [row.location for row in rows]
        path = artifacts.fetch(config, rows[0].location, rows[0].sha256)
    return checkpoints.load_checkpoint(path)[0].state_dict(), lines, locations


def resumable_files(config):
    return sorted(p.relative_to(config.artifacts) for p in (config.artifacts / "resume").rglob("*.pt")) \
        if (config.artifacts / "resume").exists() else []


def same(found: dict, expected: dict) -> bool:
    return found.keys() == expected.keys() and all(torch.equal(found[k], expected[k]) for k in found)


def test_a_train_job_stopped_after_epoch_1_resumes_there_and_stores_the_same_model(home, uninterrupted, monkeypatch):
    config, engine = home
    job = submitted(config, engine)
    set_progress = repo.set_progress

    def killed_after_epoch_1(session, job_id, done, total):  # the worker dies once epoch 1 is reported
        set_progress(session, job_id, done, total)
        if done == 1:
            raise Stopped

    monkeypatch.setattr(repo, "set_progress", killed_after_epoch_1)
    with pytest.raises(Stopped):
        train_kind.run_training(engine, config, job, JOB_SPEC, "cpu")
    [kept] = resumable_files(config)
    assert kept.parts[:2] == ("resume", f"job-{job}")
    monkeypatch.setattr(repo, "set_progress", set_progress)
    train_kind.run_training(engine, config, job, JOB_SPEC, "cpu")
    found, lines, locations = weights_and_logs(config, engine, job)
    resumed = lines.index("resuming at epoch 2 of 2")
    assert [line for line in lines[resumed:] if line.startswith("epoch ")] == [lines[-2]] and \
        lines[-2].startswith("epoch 2/2 loss")  # epoch 1 was not trained again
    assert same(found, uninterrupted[0])
    assert resumable_files(config) == [] and not any("resume" in location for location in locations)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_resumable_checkpoint_starts_the_job_over_in_one_line(home, uninterrupted, damage):
    config, engine = home
    job = submitted(config, engine)
    state = config.home / "state.pt"
    if damage == "garbage":
        state.write_bytes(b"\x00not a torch file" * 100)
    else:  # a real state cut short, as an upload or a disk that failed half way leaves it
        torch.save(uninterrupted[1], state)
        state.write_bytes(state.read_bytes()[:state.stat().st_size // 2])
    artifacts.store_for(config).put_at(state, trainstate.key(job, JOB_SPEC.to_dict(), {}))
    train_kind.run_training(engine, config, job, JOB_SPEC, "cpu")
    found, lines, _ = weights_and_logs(config, engine, job)
    said = [line for line in lines if "resumable checkpoint" in line]
    assert len(said) == 1 and said[0].startswith("the resumable checkpoint cannot be read (") and \
        said[0].endswith("); starting over from epoch 1") and "\n" not in said[0], said
    assert [line[:9] for line in lines if line.startswith("epoch ")] == ["epoch 1/2", "epoch 2/2"]
    assert same(found, uninterrupted[0])
    assert resumable_files(config) == []


def test_the_key_names_the_job_and_changes_with_its_spec_and_models():
    spec, sources = JOB_SPEC.to_dict(), {"job:1": {"location": "sha256/a.pt", "sha256": "a" * 64}}
    at = trainstate.key(7, spec, sources)
    assert at.startswith(trainstate.folder(7) + "/") and at == trainstate.key(7, dict(spec), dict(sources))
    others = {trainstate.key(8, spec, sources), trainstate.key(7, {**spec, "lr": 0.01}, sources),
              trainstate.key(7, spec, {"job:1": {"location": "sha256/b.pt", "sha256": "b" * 64}})}
    assert at not in others and len(others) == 3


def test_the_checkpoint_interval_is_a_setting():
    from dsq.errors import InvalidArgument
    from dsq.settings import Settings

    assert Settings.from_env({}).train_checkpoint_seconds == 300
    assert Settings.from_env({"DSQ_TRAIN_CHECKPOINT_SECONDS": "60"}).train_checkpoint_seconds == 60
    for bad in ("0", "-5", "soon"):
        with pytest.raises(InvalidArgument, match="DSQ_TRAIN_CHECKPOINT_SECONDS must be a number of seconds > 0"):
            Settings.from_env({"DSQ_TRAIN_CHECKPOINT_SECONDS": bad})
