"""Checkpoints: round trips, reference formats, and clear errors for bad files."""

import argparse
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from dsq.checkpoints import (CIFAR10_NORMALIZATION, file_sha256, load_checkpoint,
                             save_checkpoint)
from dsq.classifiers import CifarResNet, NormalizeLayer, build_classifier
from dsq.denoisers import build_denoiser
from dsq.errors import CheckpointError, InvalidArgument

DIGITS = {"mean": [0.3], "std": [0.2]}


def randomize(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and name.split(".")[-1] not in ("means", "sds"):
                values = torch.rand(tensor.shape, generator=generator)
                tensor.copy_(values * 0.1 + (0.5 if "running_var" in name else 0.0))
    return model


def tiny_denoiser():
    return randomize(build_denoiser("dncnn", 1, depth=4, width=8))


def digits_classifier():
    model = build_classifier("small_cnn", num_classes=10, in_channels=1, **DIGITS)
    return randomize(model)


def save_tiny_denoiser(path, **overrides):
    arguments = dict(kind="denoiser", arch="dncnn", arch_kwargs={"in_channels": 1, "depth": 4, "width": 8},
                     model=tiny_denoiser(), normalization=None,
                     training_spec={"objective": "mse", "sigma": 0.25}, metrics={"test_mse": 0.01})
    arguments.update(overrides)
    return save_checkpoint(path, **arguments)


def test_denoiser_round_trip(tmp_path):
    source = tiny_denoiser().eval()
    path = tmp_path / "denoiser.pt"
    sha = save_tiny_denoiser(path, model=source, metrics={"test_mse": np.float32(0.5), "epochs": np.int64(3)})
    model, metadata = load_checkpoint(path)
    assert sha == metadata["sha256"] == file_sha256(path)
    assert metadata["format"] == "dsq-checkpoint" and metadata["version"] == 1
    assert metadata["kind"] == "denoiser" and metadata["normalization"] is None
    assert metadata["training_spec"] == {"objective": "mse", "sigma": 0.25}
    assert metadata["metrics"] == {"test_mse": 0.5, "epochs": 3}
    assert "state_dict" not in metadata and not model.training
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))
    assert [p.name for p in tmp_path.iterdir()] == ["denoiser.pt"]  # no temp file left


def test_classifier_round_trip_keeps_the_normalization_inside(tmp_path):
    source = digits_classifier().eval()
    path = tmp_path / "sub" / "classifier.pt"
    sha = save_checkpoint(path, kind="classifier", arch="small_cnn",
                          arch_kwargs={"num_classes": 10, "in_channels": 1}, model=source,
                          normalization=DIGITS, training_spec={}, metrics={"accuracy": 0.9})
    raw = torch.load(path, weights_only=True)
    assert torch.equal(raw["state_dict"]["0.means"], torch.tensor([0.3]))
    model, metadata = load_checkpoint(path)
    assert sha == metadata["sha256"]
    assert metadata["normalization"] == DIGITS
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


def test_saving_twice_replaces_the_file_and_hashes_change(tmp_path):
    path = tmp_path / "d.pt"
    first = save_tiny_denoiser(path, metrics={"epoch": 1})
    second = save_tiny_denoiser(path, metrics={"epoch": 2})
    assert first != second and file_sha256(path) == second


def test_save_rejects_a_description_that_does_not_rebuild_the_model(tmp_path):
    with pytest.raises(InvalidArgument, match="shape"):
        save_tiny_denoiser(tmp_path / "d.pt", arch_kwargs={"in_channels": 1, "depth": 4, "width": 16})
    with pytest.raises(InvalidArgument, match="missing"):
        save_tiny_denoiser(tmp_path / "d.pt", arch_kwargs={"in_channels": 1, "depth": 6, "width": 8})
    with pytest.raises(InvalidArgument, match=r"at least \['in_channels'\]"):
        save_tiny_denoiser(tmp_path / "d.pt", arch_kwargs={"depth": 4, "width": 8})
    with pytest.raises(InvalidArgument, match="metrics.note"):
        save_tiny_denoiser(tmp_path / "d.pt", metrics={"note": object()})
    with pytest.raises(InvalidArgument, match="differs"):
        save_checkpoint(tmp_path / "c.pt", kind="classifier", arch="small_cnn",
                        arch_kwargs={"num_classes": 10, "in_channels": 1}, model=digits_classifier(),
                        normalization={"mean": [0.5], "std": [0.2]}, training_spec={}, metrics={})
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("with_buffers, prefix", [(True, "1.module."), (False, "1."), (False, "module.1.")])
def test_cohen_style_classifier_loads(tmp_path, with_buffers, prefix):
    net = randomize(CifarResNet(20, num_classes=10)).eval()
    state = {f"{prefix}{key}": value for key, value in net.state_dict().items()}
    if with_buffers:  # forks that register Cohen's NormalizeLayer attributes as buffers
        state["0.means"] = torch.tensor(CIFAR10_NORMALIZATION["mean"])
        state["0.sds"] = torch.tensor(CIFAR10_NORMALIZATION["std"])
    torch.save({"epoch": 90, "arch": "cifar_resnet20", "state_dict": state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}},
               tmp_path / "checkpoint.pth.tar")
    model, metadata = load_checkpoint(tmp_path / "checkpoint.pth.tar")
    assert metadata["kind"] == "classifier" and metadata["arch"] == "cifar_resnet20"
    assert metadata["arch_kwargs"] == {"num_classes": 10, "in_channels": 3}
    assert metadata["normalization"]["std"] == pytest.approx(CIFAR10_NORMALIZATION["std"])
    reference = torch.nn.Sequential(NormalizeLayer(**{"mean": CIFAR10_NORMALIZATION["mean"],
                                                      "std": CIFAR10_NORMALIZATION["std"]}), net)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-6)


def test_empty_file(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "empty.pt")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nothing.pt")


def test_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.pt"
    for seed in range(20):  # random bytes take different paths through the unpickler: each is one clear line
        path.write_bytes(np.random.default_rng(seed).bytes(4096))
        with pytest.raises(CheckpointError, match="corrupt") as caught:
            load_checkpoint(path)
        assert "\n" not in str(caught.value) and "torch.save" in str(caught.value)


def test_truncated_file(tmp_path):
    path = tmp_path / "d.pt"
    save_tiny_denoiser(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


class NotPlainData:
    pass


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"arch": "dncnn", "state_dict": {}, "extra": NotPlainData()}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="Python object.*NotPlainData"):
        load_checkpoint(tmp_path / "x.pt")


def _reference_with(extra, **save_options):
    return lambda path: torch.save({"arch": "dncnn", "state_dict": tiny_denoiser().state_dict(), **extra},
                                   path, **save_options)


# Files that hold pickled Python objects, in the ways real checkpoints do: training arguments, a whole model,
# an object of a module the safe loader blocks outright (os), newer pickle protocols, the pre-1.6 torch format.
PICKLED_OBJECTS = {
    "namespace": (_reference_with({"args": argparse.Namespace(lr=0.1)}), "argparse.Namespace"),
    "whole model": (lambda path: torch.save(tiny_denoiser(), path), "DnCNN"),
    "blocked module": (_reference_with({"stat": os.stat(__file__)}), "stat_result"),
    "protocol 4": (_reference_with({"args": argparse.Namespace(lr=0.1)}, pickle_protocol=4), "argparse.Namespace"),
    "legacy format": (_reference_with({"args": argparse.Namespace(lr=0.1)}, _use_new_zipfile_serialization=False),
                      "argparse.Namespace"),
}


@pytest.mark.parametrize("case", sorted(PICKLED_OBJECTS))
def test_python_objects_are_refused_with_how_to_convert_a_trusted_file(tmp_path, case):
    write, name = PICKLED_OBJECTS[case]
    path = tmp_path / "trusted.pt"
    write(path)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    assert "Python object" in message and name in message and "weights_only=True" in message
    assert "weights_only=False" in message and "state_dict" in message  # how to convert a file one trusts
    assert "truncated" not in message and "corrupt" not in message


def test_plain_data_in_a_newer_pickle_protocol_says_how_to_resave(tmp_path):
    path = tmp_path / "p4.pt"
    _reference_with({}, pickle_protocol=4)(path)
    with pytest.raises(CheckpointError, match=r"pickle protocol 4.*re-save") as caught:
        load_checkpoint(path)
    assert "corrupt" not in str(caught.value) and "\n" not in str(caught.value)


def test_truncated_file_with_python_objects_is_still_truncated(tmp_path):
    path = tmp_path / "cut.pt"
    _reference_with({"args": argparse.Namespace(lr=0.1)}, _use_new_zipfile_serialization=False)(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def run_without_file_access(code: str, *paths) -> subprocess.CompletedProcess:
    """Run Python ``code`` (argv: paths) with root's power to ignore file modes dropped (a root test runner)."""
    capabilities = "-dac_override,-dac_read_search"
    command = [sys.executable, "-c", textwrap.dedent(code), *map(str, paths)]
    if os.geteuid() == 0:
        command = ["setpriv", f"--bounding-set={capabilities}", f"--inh-caps={capabilities}", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.e2e
def test_unreadable_checkpoint_is_one_line(tmp_path):
    path = tmp_path / "locked.pt"
    save_tiny_denoiser(path)
    path.chmod(0)
    done = run_without_file_access("""
        import sys
        from dsq.checkpoints import load_checkpoint
        from dsq.errors import CheckpointError
        try:
            load_checkpoint(sys.argv[1])
        except CheckpointError as error:
            print(error)
    """, path)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout.count("\n") == 1
    assert str(path) in done.stdout and "cannot be read" in done.stdout and "permission denied" in done.stdout


def dsq_payload(**overrides):
    payload = {"format": "dsq-checkpoint", "version": 1, "kind": "denoiser", "arch": "dncnn",
               "arch_kwargs": {"in_channels": 1, "depth": 4, "width": 8}, "normalization": None,
               "training_spec": {}, "metrics": {}, "state_dict": tiny_denoiser().state_dict()}
    payload.update(overrides)
    return payload


@pytest.mark.parametrize("overrides, message", [
    ({"arch_kwargs": {"in_channels": 3, "depth": 4, "width": 8}}, r"shape mismatch.*dncnn\.0\.weight"),
    ({"arch_kwargs": {"in_channels": 1, "depth": 5, "width": 8}}, "missing keys"),
    ({"arch": "restormer"}, "unknown denoiser architecture 'restormer'"),
    ({"kind": "segmenter"}, "kind must be one of"),
    ({"kind": "classifier", "arch": "small_cnn"}, "at least"),
    ({"version": 7}, "version 7 is not supported"),
    ({"state_dict": {"dncnn.0.weight": [1, 2]}}, "must map parameter names"),
])
def test_dsq_checkpoint_that_does_not_match(tmp_path, overrides, message):
    torch.save(dsq_payload(**overrides), tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "bad.pt")


def test_reference_checkpoint_with_wrong_shapes_or_names(tmp_path):
    wide = build_denoiser("dncnn", 3, width=128).state_dict()
    torch.save({"arch": "memnet", "state_dict": wide}, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_checkpoint(tmp_path / "a.pt")
    torch.save({"arch": "cifar_vit", "state_dict": wide}, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="unknown reference architecture 'cifar_vit'"):
        load_checkpoint(tmp_path / "b.pt")
    torch.save({"weights": wide}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="keys 'arch' and 'state_dict'"):
        load_checkpoint(tmp_path / "c.pt")


def test_bad_device_is_an_invalid_argument(tmp_path):
    save_tiny_denoiser(tmp_path / "d.pt")
    with pytest.raises(InvalidArgument, match="device"):
        load_checkpoint(tmp_path / "d.pt", device="gpu-please")


def test_every_reference_name_maps_to_a_registered_arch():
    from dsq.checkpoints import REFERENCE_CLASSIFIERS, REFERENCE_DENOISERS
    from dsq.classifiers import CLASSIFIERS
    from dsq.denoisers import DENOISERS
    assert set(REFERENCE_DENOISERS.values()) <= set(DENOISERS)
    assert {arch for arch, _, _ in REFERENCE_CLASSIFIERS.values()} <= set(CLASSIFIERS)
    assert {"cifar_resnet20", "cifar_resnet110", "resnet50"} <= set(REFERENCE_CLASSIFIERS)  # Cohen et al.
    assert {"cifar_dncnn", "cifar_dncnn_wide", "memnet", "imagenet_dncnn",
            "imagenet_memnet"} <= set(REFERENCE_DENOISERS)  # denoised-smoothing's list
