"""Diffusion denoisers: an off-the-shelf DDPM denoises in one step (Carlini et al., ICLR 2023).

A DDPM trained on clean images, with no knowledge of any classifier, serves as the denoiser D of denoised
smoothing at every σ. Its forward process writes x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε in [−1, 1]; a smoothed
input y = x + δ, δ ~ N(0, σ²I) in [0, 1] pixels, is 2y − 1 = x0 + 2δ there. Scaled by sqrt(ᾱ_t) it is a sample
of step t exactly when (1 − ᾱ_t) / ᾱ_t = (2σ)², so:

1. t* is the first timestep whose noise level sqrt((1 − ᾱ_t) / ᾱ_t) reaches 2σ (``timestep_for_sigma``);
2. x_t* = sqrt(ᾱ_t*) (2y − 1): the noise is the smoothing noise the sampler drew, never added a second time;
3. one call of the model estimates x̂0, clipped to [−1, 1], and D(y) = (x̂0 + 1) / 2 goes to the classifier.

The radius is that of σ: D is one deterministic function inside f ∘ D like any other denoiser.

Where the model comes from:

* ``diffusers:DIR``: a folder in the format of the ``diffusers`` library (``load_diffusers``);
* ``job:N`` of ``dsq submit train --objective diffusion``: a DDPM dsq trained (``build_unet``, ``ddpm_loss``);
* ``package.module:function`` returning a ``DiffusionModel``, an ``(eps_model, alphas_cumprod)`` pair or a dict
  with those keys (``as_diffusion``): the checkpoints whose code is not on PyPI load through such a factory.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dsq import checks
from dsq.errors import CheckpointError, InvalidArgument

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")  # what the model's output is: ε, x0 or v
# The schedule dsq trains with (Ho et al. 2020): T = 1000 steps, β linear from 1e-4 to 0.02.
STANDARD_SCHEDULE = {"schedule": "linear", "timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _alphas(alphas_cumprod) -> np.ndarray:
    """ᾱ as float64, checked: a non-empty 1-d sequence of numbers in (0, 1]."""
    if isinstance(alphas_cumprod, torch.Tensor):
        alphas_cumprod = alphas_cumprod.detach().cpu().double().numpy()
    try:
        values = np.asarray(alphas_cumprod, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidArgument("alphas_cumprod must be a sequence of numbers") from None
    if values.ndim != 1 or values.size == 0 or not np.all(np.isfinite(values)) or np.any(values <= 0) \
            or np.any(values > 1):
        raise InvalidArgument(f"alphas_cumprod must be a non-empty 1-d sequence of numbers in (0, 1], "
                              f"got shape {values.shape}")
    return values


def noise_levels(alphas_cumprod) -> np.ndarray:
    """sqrt((1 − ᾱ_t) / ᾱ_t) for every timestep t: the noise of step t relative to the signal."""
    alphas = _alphas(alphas_cumprod)
    return np.sqrt((1.0 - alphas) / alphas)


def largest_sigma(alphas_cumprod) -> float:
    """The largest σ (in [0, 1] pixels) a schedule serves: half its largest noise level."""
    return float(noise_levels(alphas_cumprod).max()) / 2.0


def timestep_for_sigma(alphas_cumprod, sigma) -> int:
    """t*: the smallest timestep whose noise level sqrt((1 − ᾱ_t) / ᾱ_t) is at least 2σ.

    ``alphas_cumprod`` is indexed by the timestep the model takes. A σ beyond the schedule's last noise level is
    refused, naming the largest σ it serves.
    """
    sigma = checks.finite("sigma", sigma)
    levels = noise_levels(alphas_cumprod)
    reached = np.flatnonzero(levels >= 2.0 * sigma * (1 - 1e-12))  # a level equal to 2σ up to rounding reaches it
    if reached.size == 0:
        raise InvalidArgument(f"the diffusion model cannot denoise σ = {sigma:g}: its schedule's largest noise "
                              f"level serves σ ≤ {levels.max() / 2.0:.4g}")
    return int(reached[0])


def _epsilon_output(output, channels: int) -> torch.Tensor:
    """The model's prediction for the C image channels: the first C of 2C (a learned-variance model)."""
    if hasattr(output, "sample") and not isinstance(output, torch.Tensor):  # a diffusers UNet's output
        output = output.sample
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor) or output.dim() != 4:
        raise InvalidArgument(f"the diffusion model must return (B, C, H, W) or (B, 2C, H, W), got "
                              f"{getattr(output, 'shape', type(output).__name__)}")
    if output.shape[1] == 2 * channels:
        return output[:, :channels]
    if output.shape[1] != channels:
        raise InvalidArgument(f"the diffusion model returns {output.shape[1]} channels for {channels}-channel "
                              f"images; expected {channels} (its prediction) or {2 * channels} (with a learned "
                              f"variance)")
    return output


class OneShotDenoiser(nn.Module):
    """D(y) for y = x + δ, δ ~ N(0, σ²I), x in [0, 1]: one denoising step of a diffusion model at t*(σ).

    ``eps_model(x_t, t)`` gets t as a LongTensor of shape (B,) and returns (B, C, H, W), or (B, 2C, H, W) when it
    learns its variance. ``prediction_type`` says what it predicts: the noise ε (DDPM), the clean image x0
    (``sample``) or v = sqrt(ᾱ) ε − sqrt(1 − ᾱ) x0 (``v_prediction``). The output is in [0, 1], with y's shape.
    """

    def __init__(self, eps_model: nn.Module, alphas_cumprod, sigma: float, prediction_type: str = "epsilon", *,
                 channels: int | None = None, sample_size: int | None = None):
        super().__init__()
        self.channels, self.sample_size = channels, sample_size  # of the images the model takes, when known
        alphas = _alphas(alphas_cumprod)
        self.eps_model = eps_model
        self.sigma = float(sigma)
        self.timestep = timestep_for_sigma(alphas, sigma)
        self.timesteps = int(alphas.size)
        self.alpha_bar = float(alphas[self.timestep])
        checks.choice("prediction type", prediction_type, PREDICTION_TYPES)
        self.prediction_type = prediction_type

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        signal, noise = math.sqrt(self.alpha_bar), math.sqrt(1.0 - self.alpha_bar)
        x_t = signal * (2.0 * y - 1.0)  # y already holds the smoothing noise: scale it, add none
        t = torch.full((y.shape[0],), self.timestep, dtype=torch.long, device=y.device)
        predicted = _epsilon_output(self.eps_model(x_t, t), y.shape[1]).to(x_t.dtype)
        if self.prediction_type == "epsilon":
            x0 = (x_t - noise * predicted) / signal
        elif self.prediction_type == "v_prediction":
            x0 = signal * x_t - noise * predicted
        else:
            x0 = predicted
        return (x0.clamp(-1.0, 1.0) + 1.0) / 2.0

    def describe(self) -> str:
        """The log line that names the choice made for σ."""
        return (f"diffusion denoiser: timestep {self.timestep} of {self.timesteps} (ᾱ {self.alpha_bar:.3f}) "
                f"for σ {self.sigma:g}")

    def check_images(self, channels: int, height: int, width: int, where: str) -> None:
        """Refuse images of other channels or size than the model takes, naming both."""
        size = self.sample_size
        if (self.channels is not None and channels != self.channels) or (size and (height, width) != (size, size)):
            takes = f"{self.channels or '?'}-channel" + (f" {size}x{size}" if size else "")
            raise InvalidArgument(f"the diffusion model takes {takes} images but the images of {where} are "
                                  f"{channels}-channel {width}x{height}")


@dataclass
class DiffusionModel:
    """A diffusion model as dsq uses it: the network, its schedule and what it predicts and takes."""

    eps_model: nn.Module
    alphas_cumprod: np.ndarray
    prediction_type: str = "epsilon"
    channels: int | None = None  # of the images it takes (None: unknown)
    sample_size: int | None = None  # the height and width it was trained at (None: unknown)
    about: dict = field(default_factory=dict)  # what `dsq show` prints: schedule, T

    def __post_init__(self):
        self.alphas_cumprod = _alphas(self.alphas_cumprod)
        checks.choice("prediction type", self.prediction_type, PREDICTION_TYPES)

    def denoiser(self, sigma: float) -> OneShotDenoiser:
        return OneShotDenoiser(self.eps_model, self.alphas_cumprod, sigma, self.prediction_type,
                               channels=self.channels, sample_size=self.sample_size)


def as_diffusion(value) -> DiffusionModel | None:
    """What a user's factory returned, as a DiffusionModel when it is one (else None: an ordinary denoiser).

    Accepted: a DiffusionModel, an ``(eps_model, alphas_cumprod)`` pair, or a dict with keys ``eps_model`` and
    ``alphas_cumprod`` (and optionally ``prediction_type``, ``channels``, ``sample_size``).
    """
    if isinstance(value, DiffusionModel):
        return value
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], nn.Module):
        return DiffusionModel(value[0], value[1], about={"schedule": "given by the factory",
                                                         "timesteps": len(value[1])})
    if isinstance(value, dict) and isinstance(value.get("eps_model"), nn.Module) and "alphas_cumprod" in value:
        known = ("eps_model", "alphas_cumprod", "prediction_type", "channels", "sample_size")
        extra = sorted(set(value) - set(known))
        if extra:
            raise InvalidArgument(f"a diffusion model's dict takes the keys {', '.join(known)}; got also "
                                  f"{', '.join(extra)}")
        given = {key: value[key] for key in known if key in value}
        return DiffusionModel(**given, about={"schedule": "given by the factory",
                                              "timesteps": len(value["alphas_cumprod"])})
    return None


# ----------------------------------------------------------------------------- schedules
def schedule_alphas(schedule: dict) -> np.ndarray:
    """ᾱ of a schedule dsq trains with (``STANDARD_SCHEDULE``'s keys)."""
    if schedule.get("schedule") != "linear":
        raise InvalidArgument(f"unknown diffusion schedule {schedule.get('schedule')!r}; dsq trains 'linear'")
    betas = np.linspace(schedule["beta_start"], schedule["beta_end"], int(schedule["timesteps"]), dtype=np.float64)
    return np.cumprod(1.0 - betas)


# ----------------------------------------------------------------------------- diffusers folders
def _quiet_diffusers():
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    return diffusers


def _read_json(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: the {what} cannot be read ({checks.first_line(error)})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: the {what} must be a JSON object")
    return value


def diffusers_parts(folder: str) -> tuple[Path, Path]:
    """(the UNet folder, its scheduler config file) of a diffusers pipeline folder or UNet folder."""
    path = Path(folder)
    if not path.is_dir():
        raise CheckpointError(f"diffusers:{folder}: no such folder (it names a diffusers model folder)")
    if (path / "model_index.json").is_file():
        index = _read_json(path / "model_index.json", "pipeline index")
        if "unet" not in index:
            raise CheckpointError(f"diffusers:{folder}: the pipeline has no unet (its parts: "
                                  f"{', '.join(k for k in index if not k.startswith('_')) or 'none'})")
        unet, schedulers = path / "unet", [path / "scheduler" / "scheduler_config.json"]
    elif (path / "config.json").is_file():
        unet = path
        schedulers = [path / "scheduler_config.json", path.parent / "scheduler" / "scheduler_config.json"]
    else:
        raise CheckpointError(f"diffusers:{folder} is not a diffusers model: it has neither model_index.json "
                              f"(a pipeline folder) nor config.json (a UNet folder)")
    scheduler = next((s for s in schedulers if s.is_file()), None)
    if scheduler is None:
        raise CheckpointError(f"diffusers:{folder}: no scheduler config (looked for "
                              f"{' and '.join(str(s) for s in schedulers)}); the noise schedule is needed")
    if not (unet / "config.json").is_file():
        raise CheckpointError(f"diffusers:{folder}: {unet} has no config.json")
    return unet, scheduler


def diffusers_files(folder: str) -> list[str]:
    """The files a diffusers model is read from (its configs and weights): dsq pins their sha256 at submit."""
    unet, scheduler = diffusers_parts(folder)
    weights = [str(unet / name) for name in WEIGHT_FILES if (unet / name).is_file()][:1]
    return [str(unet / "config.json"), str(scheduler), *weights]


def load_diffusers(folder: str, device="cpu") -> DiffusionModel:
    """A diffusers ``UNet2DModel`` and its noise schedule, in eval mode. Weights are read as safetensors, or
    with ``torch.load(weights_only=True)``: nothing is unpickled."""
    unet_folder, scheduler_file = diffusers_parts(folder)
    config = _read_json(unet_folder / "config.json", "UNet config")
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise CheckpointError(f"diffusers:{folder}: the UNet is a {config['_class_name']}; dsq denoises with an "
                              f"unconditional UNet2DModel")
    scheduler = _read_json(scheduler_file, "scheduler config")
    diffusers = _quiet_diffusers()
    try:
        noise = diffusers.DDPMScheduler.from_config(scheduler)
        unet = diffusers.UNet2DModel.from_config(config)
    except Exception as error:  # noqa: BLE001 - diffusers refuses a bad config in many ways
        raise CheckpointError(f"diffusers:{folder}: the model does not build from its config "
                              f"({type(error).__name__}: {checks.first_line(error)})") from None
    _load_unet_weights(unet, unet_folder, folder)
    size = config.get("sample_size")
    size = size[0] if isinstance(size, (list, tuple)) and len(set(size)) == 1 else size
    return DiffusionModel(
        EpsModel(unet).to(torch.device(device)).eval(), noise.alphas_cumprod,
        prediction_type=_prediction_type(scheduler.get("prediction_type", "epsilon"), folder),
        channels=int(config.get("in_channels", 3)), sample_size=size if isinstance(size, int) else None,
        about={"schedule": scheduler.get("beta_schedule", "linear"), "timesteps": len(noise.alphas_cumprod),
               "scheduler": scheduler.get("_class_name", "?")})


def _prediction_type(value, where: str) -> str:
    if value not in PREDICTION_TYPES:
        raise InvalidArgument(f"{where}: prediction type {value!r} is not one dsq denoises with (it handles "
                              f"{', '.join(PREDICTION_TYPES)})")
    return value


def _load_unet_weights(unet: nn.Module, unet_folder: Path, folder: str) -> None:
    weights = next((unet_folder / name for name in WEIGHT_FILES if (unet_folder / name).is_file()), None)
    if weights is None:
        raise CheckpointError(f"diffusers:{folder}: {unet_folder} has no weights ({' or '.join(WEIGHT_FILES)})")
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights))
        else:
            state = torch.load(str(weights), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a broken or unsafe file: refused either way
        raise CheckpointError(f"{weights}: not a readable weights file ({checks.first_line(error, 160)})") from None
    expected = unet.state_dict()
    wrong = ([f"missing {k}" for k in expected if k not in state]
             + [f"unexpected {k}" for k in state if k not in expected]
             + [f"{k} is {tuple(v.shape)}, the config makes {tuple(expected[k].shape)}" for k, v in state.items()
                if k in expected and getattr(v, "shape", None) != expected[k].shape])
    if wrong:
        raise CheckpointError(f"{weights}: the weights do not fit the UNet of {unet_folder / 'config.json'} "
                              f"({len(wrong)} problems, e.g. {wrong[0]})")
    unet.load_state_dict(state)


class EpsModel(nn.Module):
    """A diffusers UNet2DModel as ``eps_model(x_t, t) -> tensor``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t, return_dict=False)[0]


# ----------------------------------------------------------------------------- training a DDPM
def build_unet(in_channels: int, sample_size: int = 32, block_out_channels=(64, 128, 128), layers_per_block=2,
               attention: bool = False, **kwargs) -> EpsModel:
    """A fresh ε-model for ``dsq submit train --objective diffusion``: a diffusers UNet2DModel.

    ``attention`` puts self-attention in the lowest resolution's blocks; further keyword arguments go to
    UNet2DModel as they are (``norm_num_groups``...).
    """
    diffusers = _quiet_diffusers()
    levels = len(block_out_channels)
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    groups = kwargs.pop("norm_num_groups", min(32, *block_out_channels))
    try:
        unet = diffusers.UNet2DModel(sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
                                     block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                                     down_block_types=tuple(down), up_block_types=tuple(up),
                                     norm_num_groups=groups, **kwargs)
    except (TypeError, ValueError) as error:
        raise InvalidArgument(f"bad arguments for the unet: {checks.first_line(error)}") from None
    return EpsModel(unet)


def ddpm_loss(eps_model: nn.Module, x: torch.Tensor, alphas_cumprod: torch.Tensor,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """The DDPM objective on clean images x in [0, 1]: E_t,ε ||ε_θ(x_t, t) − ε||², t uniform over the schedule."""
    x0 = 2.0 * x - 1.0
    t = torch.randint(0, alphas_cumprod.numel(), (x.shape[0],), generator=generator, device=x.device)
    noise = torch.randn(x0.shape, generator=generator, device=x.device, dtype=x.dtype)
    alpha = alphas_cumprod.to(x.device, x.dtype)[t].view(-1, 1, 1, 1)
    x_t = alpha.sqrt() * x0 + (1.0 - alpha).sqrt() * noise
    return F.mse_loss(_epsilon_output(eps_model(x_t, t), x.shape[1]), noise)
