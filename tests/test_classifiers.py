"""Classifiers: every registered arch, the normalization layer, and the pretrained-weights cache."""

import os

import pytest
import torch
import torchvision

from dsq.classifiers import CLASSIFIERS, NormalizeLayer, build_classifier, cached_weights_path
from dsq.errors import CheckpointError, InvalidArgument, ModelWeightsMissing, UnknownName


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def build(arch, channels=3, classes=10, **kwargs):
    return build_classifier(arch, num_classes=classes, in_channels=channels,
                            mean=[0.5] * channels, std=[0.25] * channels, **kwargs)


@pytest.mark.parametrize("arch, batch", [
    ("resnet18", 2), ("resnet34", 2), ("resnet50", 1), ("cifar_resnet20", 3),
    ("cifar_resnet110", 2), ("wrn28_10", 1), ("small_cnn", 4),
])
@pytest.mark.parametrize("channels, size, classes", [(1, 8, 7), (3, 32, 10)])
def test_maps_images_to_logits(arch, batch, channels, size, classes):
    model = build(arch, channels, classes).eval()
    with torch.no_grad():
        logits = model(torch.rand(batch, channels, size, size))
    assert logits.shape == (batch, classes)
    assert torch.isfinite(logits).all()
    assert isinstance(model[0], NormalizeLayer)


def test_parameter_counts_of_the_published_architectures():
    assert count_parameters(build("cifar_resnet20")) == 272_474
    assert count_parameters(build("cifar_resnet110")) == 1_730_714  # ≈ 1.7 M (He et al.)
    assert count_parameters(build("wrn28_10")) == 36_479_194  # ≈ 36.5 M (Zagoruyko et al.)
    assert count_parameters(build("resnet50", classes=1000)) == 25_557_032  # torchvision's
    assert 50_000 <= count_parameters(build("small_cnn", channels=1)) <= 150_000


def test_cifar_resnet_keeps_cohen_et_al_parameter_names():
    keys = set(build("cifar_resnet20")[1].state_dict())
    for key in ("conv1.weight", "bn1.running_var", "layer1.2.conv2.weight",
                "layer2.0.downsample.0.weight", "layer3.0.downsample.1.bias", "fc.bias"):
        assert key in keys
    assert "layer1.0.downsample.0.weight" not in keys  # no projection where shapes agree


def test_wide_resnet_keeps_the_reference_parameter_names():
    keys = set(build("wrn28_10")[1].state_dict())
    for key in ("conv1.weight", "block1.layer.0.convShortcut.weight", "block1.layer.3.bn2.weight",
                "block3.layer.0.convShortcut.weight", "bn1.weight", "fc.weight"):
        assert key in keys
    assert "block1.layer.1.convShortcut.weight" not in keys


def test_normalize_layer_standardises_each_channel():
    layer = NormalizeLayer([0.1, 0.2, 0.3], [0.5, 0.25, 2.0])
    x = torch.rand(2, 3, 4, 5)
    expected = torch.stack([(x[:, c] - m) / s for c, (m, s) in
                            enumerate(zip([0.1, 0.2, 0.3], [0.5, 0.25, 2.0]))], dim=1)
    assert torch.allclose(layer(x), expected)
    assert set(layer.state_dict()) == {"means", "sds"}
    with pytest.raises(InvalidArgument, match=r"\[B, 3, H, W\]"):
        layer(torch.rand(2, 1, 4, 5))


def test_normalization_buffers_move_with_the_model():
    model = build("small_cnn", channels=1)
    moved = model.to("meta")
    assert moved[0].means.device.type == "meta" and moved[0].sds.device.type == "meta"
    model = build("small_cnn", channels=1).to(torch.float64)
    assert model[0].means.dtype == torch.float64


def test_bad_normalization_is_rejected():
    with pytest.raises(InvalidArgument, match="std must be > 0"):
        NormalizeLayer([0.5], [0.0])
    with pytest.raises(InvalidArgument, match="equal length"):
        NormalizeLayer([0.5, 0.5], [0.2])
    with pytest.raises(InvalidArgument, match="one value per input channel"):
        build_classifier("small_cnn", num_classes=10, in_channels=3, mean=[0.5], std=[0.2])


def test_unknown_arch_lists_the_known_ones():
    with pytest.raises(UnknownName, match="cifar_resnet110"):
        build("vgg16")
    assert {"resnet18", "resnet34", "resnet50", "cifar_resnet20", "cifar_resnet110",
            "wrn28_10", "small_cnn"} == set(CLASSIFIERS)


def test_pretrained_without_cached_weights_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected_file = os.path.join(str(tmp_path), "hub", "checkpoints", "resnet50-11ad3fa6.pth")
    assert cached_weights_path("resnet50") == expected_file
    with pytest.raises(ModelWeightsMissing, match="resnet50-11ad3fa6.pth"):
        build("resnet50", classes=1000, pretrained=True)


def test_pretrained_loads_the_cached_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = torchvision.models.resnet18(weights=None)
    os.makedirs(os.path.dirname(cached_weights_path("resnet18")))
    torch.save(cached.state_dict(), cached_weights_path("resnet18"))
    model = build("resnet18", classes=1000, pretrained=True)
    assert torch.equal(model[1].conv1.weight, cached.conv1.weight)
    assert torch.equal(model[1].fc.bias, cached.fc.bias)


def test_corrupt_cached_weights_raise_checkpoint_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    os.makedirs(os.path.dirname(cached_weights_path("resnet34")))
    with open(cached_weights_path("resnet34"), "wb") as handle:
        handle.write(b"not a torch file")
    with pytest.raises(CheckpointError, match="delete the file"):
        build("resnet34", classes=1000, pretrained=True)


def test_pretrained_needs_imagenet_shapes_and_an_available_source():
    with pytest.raises(InvalidArgument, match="1000 classes"):
        build("resnet18", classes=10, pretrained=True)
    with pytest.raises(InvalidArgument, match="no pretrained weights"):
        build("cifar_resnet20", pretrained=True)
