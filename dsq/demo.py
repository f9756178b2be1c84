"""The embedded end-to-end job: the digits preset (``experiments/digits.toml``), sized for the command line.

On scikit-learn's 8x8 digits (native resolution), as in Salman et al.'s experiments but small
enough for a 2-core CPU: a standard classifier f and a surrogate; per sigma an MSE denoiser,
STAB+MSE fine-tunes against f (white-box) and against the surrogate only (black-box), and a
Gaussian-trained classifier (Cohen et al.'s row); every method certified per sigma.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dsq import experiments
from dsq.kinds.certify import CertifySpec

# What a --quick demo's tables are worth: one epoch per model says that the pipeline runs, not how methods compare.
QUICK_NOTE = ("--quick: one epoch per model checks the pipeline, not the numbers: these accuracies compare "
              "nothing (run dsq demo without --quick for the methods' numbers)")
PRESET = Path(__file__).resolve().parents[1] / "experiments" / "digits.toml"


def plan(*, n: int | None = None, max_images: int | None = None, quick: bool = False) -> experiments.Plan:
    """The preset with the demo's options: n, at most max_images digits, and one epoch per model when quick."""
    preset = experiments.load(PRESET)
    steps = []
    for step in preset.steps:
        spec = step.spec
        if isinstance(spec, CertifySpec):
            changes = {"n": n or spec.n, "max_images": max_images or spec.max_images}
        else:
            changes = {"epochs": 1, "lr_step": 1} if quick else {}
        steps.append(dataclasses.replace(step, spec=dataclasses.replace(spec, **changes)))
    return dataclasses.replace(preset, steps=steps)
