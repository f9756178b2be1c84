"""What the diffusion row costs the demo: ``dsq demo`` with and without it, one after the other, in one run.

Each run gets a throw-away home and its own local Ray, as a new user's ``make demo`` does. The run without the
row uses the digits preset less its DDPM and its "diffusion (one-shot)" method. Usage:
``python -m bench.demo_cost [--repeats 1] [-- DEMO OPTIONS]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "experiments" / "digits.toml"


def without_diffusion(text: str) -> str:
    """The preset's text less the [models.ddpm] table and the method that uses it (the file's comments kept)."""
    blocks, current = [], []
    for line in text.splitlines(keepends=True):
        if line.startswith("[") and current:
            blocks.append("".join(current))
            current = []
        current.append(line)
    blocks.append("".join(current))
    kept = [b for b in blocks if not b.startswith("[models.ddpm]") and 'denoiser = "ddpm"' not in b]
    stripped = "".join(kept)
    data = tomllib.loads(stripped)
    assert "ddpm" not in data["models"] and all(m.get("denoiser") != "ddpm" for m in data["methods"])
    return stripped


def run_demo(preset: Path, options: list[str]) -> float:
    with tempfile.TemporaryDirectory(prefix="dsq-demo-cost-") as home:
        env = {**os.environ, "DSQ_HOME": home, "DSQ_WORKER_AUTOSTART": "0"}
        env.pop("DSQ_DATABASE_URL", None)
        code = ("import sys, dsq.demo; dsq.demo.PRESET = __import__('pathlib').Path(sys.argv[1]); "
                "from cli.main import app; sys.argv = ['dsq', *sys.argv[2:]]; app()")
        started = time.monotonic()
        out = subprocess.run([sys.executable, "-c", code, str(preset), "demo", "--plot", f"{home}/curves.png",
                              *options], cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.monotonic() - started
        if out.returncode != 0:
            raise SystemExit(f"dsq demo failed ({out.returncode}):\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
        return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("options", nargs="*", help="passed to dsq demo (after --)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        plain = Path(folder) / "digits-without-diffusion.toml"
        plain.write_text(without_diffusion(PRESET.read_text()))
        times = {"without": [], "with": []}
        for _ in range(args.repeats):
            for label, preset in (("without", plain), ("with", PRESET)):
                times[label].append(run_demo(preset, args.options))
                print(f"dsq demo {label} the diffusion row: {times[label][-1]:.0f} s", flush=True)
    best = {label: min(values) for label, values in times.items()}
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print(f"the diffusion row adds {best['with'] - best['without']:.0f} s "
          f"({best['with'] / best['without']:.2f}x the demo without it; best of {args.repeats})")


if __name__ == "__main__":
    main()
