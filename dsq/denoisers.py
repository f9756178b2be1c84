"""Denoisers D for denoised smoothing (Salman et al. 2020, Section 3 and Appendix A).

Denoised smoothing certifies the smoothed classifier g(x) = argmax_c P[f(D(x + δ)) = c],
δ ~ N(0, σ²I): the denoiser D maps a noisy image x + δ in [0, 1] pixel space to an
estimate of the clean image x, which the frozen classifier f then labels.

Architectures (the paper's Appendix A):

* ``dncnn`` — DnCNN (Zhang et al. 2017): 17 conv layers of 64 channels with batch norm,
  residual learning: the network predicts the noise δ̂ and D(x + δ) = (x + δ) − δ̂.
* ``dncnn_wide`` — the same with 128 channels.
* ``memnet`` — MemNet (Tai et al. 2017): 64 channels, 3 memory blocks of 6 residual
  blocks each, dense long-term memory through 1×1 gate convolutions, global residual.

Parameter names follow microsoft/denoised-smoothing (``archs/dncnn.py``,
``archs/memnet.py``) so its published state dicts load after stripping ``module.``.
Outputs are not clamped, as in the reference: D returns an image estimate whose
pixels may leave [0, 1] slightly; whoever needs a valid image (the API path) clamps.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from dsq import checks
from dsq.errors import InvalidArgument, UnknownName

# The reference DnCNN uses these batch-norm settings. eps changes eval outputs, so it
# must match for published checkpoints to reproduce; momentum=0.95 is kept as well
# (in PyTorch's convention it weights the newest batch by 0.95).
_DNCNN_BN_EPS = 1e-4
_DNCNN_BN_MOMENTUM = 0.95




class DnCNN(nn.Module):
    """DnCNN: D(x̃) = x̃ − R(x̃), where R is a plain conv net that estimates the noise δ.

    Layout (the reference's ``self.dncnn`` Sequential, so keys read ``dncnn.<i>.*``):
    conv(C→w, bias) + ReLU, then ``depth − 2`` × [conv(w→w, no bias) + BN + ReLU],
    then conv(w→C, no bias). Convolutions are 3×3 with padding 1 (size preserving).

    Initialisation as in the reference: orthogonal conv weights, zero biases, BN
    weight 1 / bias 0, and the last conv zeroed, so that R ≡ 0 and D is the identity
    at initialisation (training starts from "no denoising").
    """

    def __init__(self, in_channels: int = 3, depth: int = 17, width: int = 64):
        super().__init__()
        self.in_channels = checks.positive_int("in_channels", in_channels)
        self.depth = checks.positive_int("depth", depth, minimum=2)
        self.width = checks.positive_int("width", width)
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, width, kernel_size=3, padding=1, bias=True),
            nn.ReLU(inplace=True),
        ]
        for _ in range(depth - 2):
            layers += [
                nn.Conv2d(width, width, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(width, eps=_DNCNN_BN_EPS, momentum=_DNCNN_BN_MOMENTUM),
                nn.ReLU(inplace=True),
            ]
        layers.append(nn.Conv2d(width, in_channels, kernel_size=3, padding=1, bias=False))
        self.dncnn = nn.Sequential(*layers)
        self._initialize()

    def _initialize(self) -> None:
        convs = [m for m in self.modules() if isinstance(m, nn.Conv2d)]
        for conv in convs:
            nn.init.orthogonal_(conv.weight)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        for bn in (m for m in self.modules() if isinstance(m, nn.BatchNorm2d)):
            nn.init.ones_(bn.weight)
            nn.init.zeros_(bn.bias)
        nn.init.zeros_(convs[-1].weight)

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        predicted_noise = self.dncnn(noisy)
        return noisy - predicted_noise


class BNReLUConv(nn.Sequential):
    """Pre-activation unit of MemNet: BN → ReLU → conv (no bias); keys ``bn.*``, ``conv.*``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.add_module("bn", nn.BatchNorm2d(in_channels))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module(
            "conv",
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=1,
                      padding=kernel_size // 2, bias=False),
        )


class ResidualBlock(nn.Module):
    """Recursive unit of MemNet: x + BNReLUConv(BNReLUConv(x))."""

    def __init__(self, channels: int):
        super().__init__()
        self.relu_conv1 = BNReLUConv(channels, channels)
        self.relu_conv2 = BNReLUConv(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.relu_conv2(self.relu_conv1(x))


class MemoryBlock(nn.Module):
    """Memory block m (1-based) of MemNet.

    Short-term memory: the outputs of ``num_resblock`` chained residual blocks.
    Long-term memory: the feature map entering the network and the outputs of the
    m − 1 earlier memory blocks. A 1×1 gate unit fuses the
    (num_resblock + m) × channels concatenation back to ``channels``.
    """

    def __init__(self, channels: int, num_resblock: int, block_index: int):
        super().__init__()
        self.recursive_unit = nn.ModuleList(ResidualBlock(channels) for _ in range(num_resblock))
        self.gate_unit = BNReLUConv((num_resblock + block_index) * channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor, long_term: list[torch.Tensor]) -> torch.Tensor:
        short_term = []
        for residual_block in self.recursive_unit:
            x = residual_block(x)
            short_term.append(x)
        return self.gate_unit(torch.cat(short_term + long_term, dim=1))


class MemNet(nn.Module):
    """MemNet: D(x̃) = x̃ + reconstructor(memory blocks(feature_extractor(x̃))).

    Unlike DnCNN the reference keeps PyTorch's default initialisation, so D is not the
    identity at initialisation; zeroing ``reconstructor.conv.weight`` makes it one.
    """

    def __init__(self, in_channels: int = 3, width: int = 64,
                 num_memblock: int = 3, num_resblock: int = 6):
        super().__init__()
        self.in_channels = checks.positive_int("in_channels", in_channels)
        checks.positive_int("width", width)
        checks.positive_int("num_memblock", num_memblock)
        checks.positive_int("num_resblock", num_resblock)
        self.feature_extractor = BNReLUConv(in_channels, width)
        self.reconstructor = BNReLUConv(width, in_channels)
        self.dense_memory = nn.ModuleList(
            MemoryBlock(width, num_resblock, m + 1) for m in range(num_memblock)
        )

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        features = self.feature_extractor(noisy)
        long_term = [features]
        for memory_block in self.dense_memory:
            features = memory_block(features, long_term)
            long_term = long_term + [features]
        return noisy + self.reconstructor(features)


def dncnn(in_channels: int = 3, depth: int = 17, width: int = 64) -> DnCNN:
    """DnCNN with the paper's defaults (17 layers, 64 channels)."""
    return DnCNN(in_channels=in_channels, depth=depth, width=width)


def dncnn_wide(in_channels: int = 3, depth: int = 17, width: int = 128) -> DnCNN:
    """DnCNN-wide: the same network with 128 channels."""
    return DnCNN(in_channels=in_channels, depth=depth, width=width)


def memnet(in_channels: int = 3, width: int = 64, num_memblock: int = 3,
           num_resblock: int = 6) -> MemNet:
    """MemNet with the paper's defaults (64 channels, 3 memory blocks of 6 residual blocks)."""
    return MemNet(in_channels=in_channels, width=width,
                  num_memblock=num_memblock, num_resblock=num_resblock)


def _unet(in_channels: int, **kwargs) -> nn.Module:
    """The ε-model of a DDPM (``dsq.diffusion.build_unet``): a denoiser at every σ once paired with its schedule."""
    from dsq import diffusion  # diffusers: only for this architecture

    return diffusion.build_unet(in_channels, **kwargs)


DENOISERS: dict[str, Callable[..., nn.Module]] = {
    "dncnn": dncnn,
    "dncnn_wide": dncnn_wide,
    "memnet": memnet,
}
# ε-models: trained by the diffusion objective, they denoise once paired with a schedule (dsq.diffusion).
DIFFUSION_ARCHS: dict[str, Callable[..., nn.Module]] = {"unet": _unet}


def build_denoiser(arch: str, in_channels: int, **kwargs) -> nn.Module:
    """Build a freshly initialised denoiser by registry name (``DENOISERS``)."""
    builders = {**DENOISERS, **DIFFUSION_ARCHS}
    if arch not in builders:
        known = ", ".join(sorted(builders))
        raise UnknownName(f"unknown denoiser architecture {arch!r}; known: {known}")
    try:
        return builders[arch](in_channels=in_channels, **kwargs)
    except TypeError as error:
        raise InvalidArgument(f"bad arguments for denoiser {arch!r}: {error}") from None
