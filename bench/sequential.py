"""Sequential against fixed-n certification: the same votes, three answers.

Each test image is sampled once: n0 selection samples, then ``MAX_N`` estimation samples in batches
of ``BATCH``, keeping the votes for cA of every batch (``ImageVotes``). Every answer below is a pure
function of those counts in batch order, as the jobs compute it:

- fixed n (``FIXED_N``): CERTIFY (Cohen et al.) on the first n estimation samples: Clopper-Pearson
  p_lower, R = sigma * Phi^-1(p_lower); certified at r when cA is the label and R >= r
- sequential at r: ``dsq.sequential.decide`` on the batches, max_n = ``MAX_N``; certified at r when the
  test certifies and cA is the label; its cost is the estimation samples the test counted. alpha is
  split as the test splits it (``dsq.sequential.FINAL_SHARE``): the confidence sequence at alpha_seq, and
  an image undecided at max_n gets the final Clopper-Pearson decision at alpha_final on all MAX_N samples

Certified accuracy is over all images (abstains and wrong classes count as failures); costs are
estimation samples per image (n0 is the same for all three and left out).
``TARGETS`` are the issue's: accuracy within 2 points of fixed n = 10,000, 20x fewer samples at the
median and 5x fewer on average.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

from dsq import sequential, smoothing

N0 = 100  # the digits preset's [certify] n0
SEED = 0  # any fixed seed: the votes, and so every number, are the same when the models are reused
MAX_N = 10_000  # the max_n: the sequential test is compared with fixed n = MAX_N
BATCH = 100  # a look every 100 samples: dsq.sizing.sequential_batch's choice for max_n = 10,000
FIXED_N = (10_000, 1_000)  # n = MAX_N (the accuracy target's reference) and the demo's n = 1,000
RADII = (0.1, 0.2, 0.3, 0.4)  # reachable at both sigmas with MAX_N samples (up to ~3.2 sigma), most digits certify
SIGMAS = (0.25, 0.5)  # the digits preset's sigmas (experiments/digits.toml)
ALPHA = 0.001  # a certify job's default alpha (Cohen et al.'s)
TARGETS = {"accuracy_points": 2.0, "median_speedup": 20.0, "mean_speedup": 5.0}  # the (see above)


@dataclass(frozen=True)
class ImageVotes:
    """One image's label, cA (from the selection samples) and votes for cA per estimation batch."""

    label: int
    c_a: int
    successes: tuple[int, ...]  # batch b: votes for cA among samples [b * BATCH, (b + 1) * BATCH)


def fixed_n_at(image: ImageVotes, n: int, radius: float, sigma: float, alpha: float = ALPHA) -> bool:
    """Certified and correct at ``radius`` by fixed-n CERTIFY on the image's first n estimation samples."""
    n_a = int(sum(image.successes[:n // BATCH]))
    p_lower = smoothing.lower_confidence_bound(n_a, n, alpha)
    return image.c_a == image.label and p_lower >= 0.5 and smoothing.radius(p_lower, sigma) >= radius


def sequential_at(image: ImageVotes, radius: float, sigma: float, alpha: float = ALPHA) -> tuple[bool, int]:
    """(certified and correct at ``radius``, estimation samples the test counted)."""
    return _sequential(image, radius, sigma, alpha)[:2]


def _sequential(image: ImageVotes, radius: float, sigma: float, alpha: float = ALPHA,
                final_share: float = sequential.FINAL_SHARE) -> tuple[bool, int, bool]:
    """``sequential_at``, and whether the certificate came from the final decision at max_n."""
    test = sequential.decide(((int(s), BATCH) for s in image.successes), p0=float(norm.cdf(radius / sigma)),
                             alpha=alpha, max_n=MAX_N, final_share=final_share)
    ok = test.decision == sequential.CERTIFIED and image.c_a == image.label
    return ok, test.trials, ok and test.trials == MAX_N


def compare(images: list[ImageVotes], sigma: float, radius: float) -> dict:
    """Certified accuracy at ``radius`` of every rule, and the sequential test's samples per image."""
    outcome = [_sequential(image, radius, sigma) for image in images]
    samples = np.array([trials for _, trials, _ in outcome], dtype=float)
    row = {"images": len(images), "sequential": float(np.mean([ok for ok, _, _ in outcome])),
           "mean_samples": float(samples.mean()), "median_samples": float(np.median(samples)),
           "certified_at_max_n": int(sum(final for _, _, final in outcome))}
    for n in FIXED_N:
        row[f"fixed_{n}"] = float(np.mean([fixed_n_at(image, n, radius, sigma) for image in images]))
    row["mean_speedup"] = MAX_N / row["mean_samples"]
    row["median_speedup"] = MAX_N / row["median_samples"]
    row["accuracy_points"] = 100 * (row[f"fixed_{MAX_N}"] - row["sequential"])
    return row


def meets(row: dict) -> dict[str, bool]:
    """Which of ``TARGETS`` a row meets."""
    return {"accuracy": row["accuracy_points"] <= TARGETS["accuracy_points"],
            "median": row["median_speedup"] >= TARGETS["median_speedup"],
            "mean": row["mean_speedup"] >= TARGETS["mean_speedup"]}


HEADER = ["method", "sigma", "r", "sequential %", f"fixed n={FIXED_N[0]:,} %", f"fixed n={FIXED_N[1]:,} %",
          "mean samples", "median samples", "fewer (mean)", "fewer (median)", "certified at max_n"]


def table(rows: list[dict]) -> list[list[str]]:
    """One line per (method, sigma, r): accuracies side by side, the sequential test's samples per image, and
    the images it certified with the final decision at max_n."""
    return [[row["method"], f"{row['sigma']:g}", f"{row['radius']:g}", f"{100 * row['sequential']:.1f}",
             f"{100 * row[f'fixed_{FIXED_N[0]}']:.1f}", f"{100 * row[f'fixed_{FIXED_N[1]}']:.1f}",
             f"{row['mean_samples']:,.0f}", f"{row['median_samples']:,.0f}", f"{row['mean_speedup']:.1f}x",
             f"{row['median_speedup']:.1f}x", str(row["certified_at_max_n"])] for row in rows]
