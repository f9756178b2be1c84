"""Base classifiers f for (denoised) randomized smoothing.

A classifier here is ``nn.Sequential(NormalizeLayer(mean, std), net)``: it takes images in
[0, 1] pixel space and standardises them itself. Cohen et al. (2019, Section 4 / their
``datasets.py``) put the normalization inside the classifier so that the Gaussian noise
δ ~ N(0, σ²I) is added — and the certified L2 radius measured — in pixel space.

Architectures (registry ``CLASSIFIERS``), all for any ``in_channels`` and ``num_classes``:

* ``resnet18|34|50`` — torchvision ImageNet ResNets (optionally pretrained, from the cache).
* ``cifar_resnet20|110`` — the CIFAR ResNet (depth 6n+2, basic blocks) used by Cohen et al.;
  parameter names follow locuslab/smoothing ``archs/cifar_resnet.py``.
* ``wrn28_10`` — Wide-ResNet-28-10 (Zagoruyko & Komodakis 2016), with the parameter names
  of the widely used implementation that microsoft/denoised-smoothing ships (``cifar_wrn``).
* ``small_cnn`` — a ~0.1 M parameter conv net for 8×8 digits that also runs at 32×32.

Pooling before the linear head is adaptive in every net, so a net built for 32×32 also
runs at other resolutions; at the native resolution it equals the reference pooling.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Callable
from urllib.parse import urlparse

import torch
from torch import nn

from dsq import checks
from dsq.errors import CheckpointError, InvalidArgument, ModelWeightsMissing, UnknownName


class NormalizeLayer(nn.Module):
    """x ↦ (x − μ_c) / s_c per channel c, for a batch [B, C, H, W] of images in [0, 1].

    μ and s are registered buffers named ``means`` and ``sds`` (the attribute names of
    Cohen et al.'s layer), so they move with ``.to(device)`` and are saved in the
    classifier's state dict as ``0.means`` / ``0.sds``.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean, std = [float(m) for m in mean], [float(s) for s in std]
        if not mean or len(mean) != len(std):
            raise InvalidArgument(
                f"mean and std must be non-empty lists of equal length (one value per channel), "
                f"got mean={mean} std={std}"
            )
        if not all(s > 0 for s in std):
            raise InvalidArgument(f"every std must be > 0, got std={std}")
        means = torch.tensor(mean, dtype=torch.float32)
        sds = torch.tensor(std, dtype=torch.float32)
        self.register_buffer("means", means)
        self.register_buffer("sds", sds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.means.numel():
            raise InvalidArgument(
                f"expected images [B, {self.means.numel()}, H, W], got shape {tuple(x.shape)}"
            )
        return (x - self.means.view(1, -1, 1, 1)) / self.sds.view(1, -1, 1, 1)


# ----------------------------------------------------------------------------- CIFAR ResNet
class BasicBlock(nn.Module):
    """Post-activation basic block: relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x))."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet for 32×32 inputs (He et al. 2016, Section 4.2): depth = 6n + 2.

    conv3×3(16) → 3 stages of n basic blocks with 16, 32, 64 planes (stride 1, 2, 2)
    → global average pool → linear. Init as the reference: N(0, 2/(k²·out)) conv
    weights, BN weight 1 / bias 0.
    """

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise InvalidArgument(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 110...), got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(16, 16, blocks_per_stage, stride=1)
        self.layer2 = self._stage(16, 32, blocks_per_stage, stride=2)
        self.layer3 = self._stage(32, 64, blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ----------------------------------------------------------------------------- Wide-ResNet
class WideBasicBlock(nn.Module):
    """Pre-activation wide block; keys ``bn1, conv1, bn2, conv2, convShortcut``."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(
            in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        # With a projection the shortcut also sees the pre-activated input.
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return shortcut + out


class NetworkBlock(nn.Module):
    """A group of wide blocks, kept in ``self.layer`` (keys ``blockK.layer.i.*``)."""

    def __init__(self, blocks: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*(
            WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
            for i in range(blocks)
        ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k: conv(16) → 3 groups of (depth−4)/6 blocks of 16k, 32k, 64k channels."""

    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10,
                 in_channels: int = 3):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise InvalidArgument(f"Wide-ResNet depth must be 6n+4 with n >= 1 (28, 40...), got {depth}")
        blocks = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.block1 = NetworkBlock(blocks, widths[0], widths[1], stride=1)
        self.block2 = NetworkBlock(blocks, widths[1], widths[2], stride=2)
        self.block3 = NetworkBlock(blocks, widths[2], widths[3], stride=2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


# ----------------------------------------------------------------------------- small CNN
class SmallCNN(nn.Module):
    """conv32 → conv64 → maxpool/2 → conv128 → adaptive avg pool 2×2 → linear.

    Each conv is 3×3 + BN + ReLU. About 98 k parameters for 1 channel and 10 classes;
    sized for 8×8 digits (the 2×2 pool keeps coarse layout), also fine at 32×32.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, width), *_conv_bn_relu(width, 2 * width), nn.MaxPool2d(2),
            *_conv_bn_relu(2 * width, 4 * width), nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Linear(4 * width * 2 * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


# ----------------------------------------------------------------------------- ImageNet ResNets
# name: its builder and weights enum in torchvision.models (imported when one is built: importing torchvision's
# model zoo costs about a second, which every job that uses no torchvision model would pay)
_TORCHVISION_RESNETS = {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights", "resnet50": "ResNet50_Weights"}


def _torchvision(arch: str):
    """``(builder, weights enum)`` of torchvision's ``arch``."""
    from torchvision import models

    return getattr(models, arch), getattr(models, _TORCHVISION_RESNETS[arch])


def cached_weights_path(arch: str) -> str:
    """Where torch hub keeps the default pretrained weights of a torchvision ResNet."""
    url = _torchvision(arch)[1].DEFAULT.url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))


def _pretrained_state_dict(arch: str) -> dict:
    weights = _torchvision(arch)[1].DEFAULT
    path = cached_weights_path(arch)
    if not os.path.isfile(path):
        raise ModelWeightsMissing(
            f"pretrained weights for {arch} are not cached and this machine cannot download them: "
            f"put {weights.url} at {path} (or point TORCH_HOME at a folder whose hub/checkpoints has it)"
        )
    try:
        return weights.get_state_dict(progress=False, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt or truncated cache file
        raise CheckpointError(
            f"cached pretrained weights {path} cannot be read ({type(error).__name__}); "
            f"delete the file and put a fresh copy of {weights.url} there"
        ) from None


def _torchvision_resnet(arch: str, num_classes: int, in_channels: int, pretrained: bool) -> nn.Module:
    build = _torchvision(arch)[0]
    if pretrained:
        if num_classes != 1000 or in_channels != 3:
            raise InvalidArgument(
                f"pretrained {arch} has ImageNet's 1000 classes and 3 channels, "
                f"got num_classes={num_classes}, in_channels={in_channels}"
            )
        net = build(weights=None)
        net.load_state_dict(_pretrained_state_dict(arch))
        return net
    net = build(weights=None, num_classes=num_classes)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    return net


# ----------------------------------------------------------------------------- registry
def _no_pretrained(arch: str, pretrained: bool) -> None:
    if pretrained:
        raise InvalidArgument(f"no pretrained weights are bundled for {arch!r}; load a checkpoint instead")


def _make_torchvision(arch: str) -> Callable[..., nn.Module]:
    def builder(num_classes: int, in_channels: int, pretrained: bool, **options) -> nn.Module:
        if options:
            raise InvalidArgument(f"classifier {arch!r} takes no options, got {sorted(options)}")
        return _torchvision_resnet(arch, num_classes, in_channels, pretrained)
    return builder


def _make_scratch(arch: str, build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def builder(num_classes: int, in_channels: int, pretrained: bool, **options) -> nn.Module:
        _no_pretrained(arch, pretrained)
        try:
            return build(num_classes, in_channels, **options)
        except TypeError as error:
            raise InvalidArgument(f"bad arguments for classifier {arch!r}: {error}") from None
    return builder


CLASSIFIERS: dict[str, Callable[..., nn.Module]] = {
    **{arch: _make_torchvision(arch) for arch in _TORCHVISION_RESNETS},
    "cifar_resnet20": _make_scratch("cifar_resnet20", lambda k, c: CifarResNet(20, k, c)),
    "cifar_resnet110": _make_scratch("cifar_resnet110", lambda k, c: CifarResNet(110, k, c)),
    "wrn28_10": _make_scratch("wrn28_10", lambda k, c: WideResNet(28, 10, k, c)),
    "small_cnn": _make_scratch("small_cnn", lambda k, c, width=32: SmallCNN(c, k, width)),
}


def build_classifier(arch: str, *, num_classes: int, in_channels: int,
                     mean: Sequence[float], std: Sequence[float],
                     pretrained: bool = False, **options) -> nn.Sequential:
    """Build ``Sequential(NormalizeLayer(mean, std), net)`` for images in [0, 1].

    ``options`` are architecture arguments (``small_cnn``: ``width``, its first layer's channels).
    """
    if arch not in CLASSIFIERS:
        raise UnknownName(f"unknown classifier architecture {arch!r}; known: {', '.join(sorted(CLASSIFIERS))}")
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        checks.positive_int(name, value)
    if len(mean) != in_channels:
        raise InvalidArgument(
            f"mean/std need one value per input channel ({in_channels}), got {len(mean)}"
        )
    normalize = NormalizeLayer(mean, std)
    return nn.Sequential(normalize, CLASSIFIERS[arch](num_classes, in_channels, pretrained, **options))
