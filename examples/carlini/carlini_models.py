"""Carlini et al.'s diffusion models as dsq denoisers ("Diffusion denoisers" in the README).

Their DDPMs come from OpenAI's improved-diffusion (CIFAR-10) and guided-diffusion (ImageNet 256x256), whose code is
not on PyPI: install it from its repository (``pip install -e improved-diffusion`` or ``guided-diffusion``), download
the checkpoint, and name these functions as the denoiser::

    PYTHONPATH=examples/carlini DSQ_CIFAR10_DDPM=cifar10_uncond_50M_500K.pt \\
        dsq submit certify --dataset cifar10 --denoiser carlini_models:cifar10_ddpm ...

Each returns ``(eps_model, alphas_cumprod)``: dsq picks the timestep for the job's sigma and denoises in one step.
Both models learn their variance (6 output channels); dsq takes the first 3, the predicted noise.
"""

from __future__ import annotations

import os

import torch
from torch import nn

# The flags the checkpoints were trained with (the repositories' READMEs).
CIFAR10_FLAGS = dict(image_size=32, num_channels=128, num_res_blocks=3, learn_sigma=True, dropout=0.3,
                     diffusion_steps=4000, noise_schedule="cosine")
IMAGENET_FLAGS = dict(image_size=256, num_channels=256, num_res_blocks=2, num_head_channels=64,
                      attention_resolutions="32,16,8", learn_sigma=True, class_cond=False, diffusion_steps=1000,
                      noise_schedule="linear", resblock_updown=True, use_scale_shift_norm=True, use_fp16=False)


class OpenAIEpsModel(nn.Module):
    """OpenAI's UNet as ``eps_model(x_t, t)``: the timestep scaled as its diffusion scales it during training."""

    def __init__(self, model: nn.Module, diffusion):
        super().__init__()
        self.model, self.diffusion = model, diffusion

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model(x_t, self.diffusion._scale_timesteps(t))


def _load(script_util, flags: dict, path: str):
    options = script_util.model_and_diffusion_defaults()
    options.update(flags)
    model, diffusion = script_util.create_model_and_diffusion(**options)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return OpenAIEpsModel(model.eval(), diffusion), diffusion.alphas_cumprod


def cifar10_ddpm(path: str | None = None):
    """improved-diffusion's unconditional CIFAR-10 model (cifar10_uncond_50M_500K.pt, L_hybrid objective)."""
    from improved_diffusion import script_util

    return _load(script_util, CIFAR10_FLAGS, path or os.environ["DSQ_CIFAR10_DDPM"])


def imagenet_ddpm(path: str | None = None):
    """guided-diffusion's unconditional 256x256 ImageNet model (256x256_diffusion_uncond.pt)."""
    from guided_diffusion import script_util

    return _load(script_util, IMAGENET_FLAGS, path or os.environ["DSQ_IMAGENET_DDPM"])
