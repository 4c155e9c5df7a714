"""Regenerates every figure of the documentation from the examples.

    python docs/make_figures.py            # all examples, default flags
    python docs/make_figures.py kingma_ba  # only some

Each example writes its plots under ``outputs/<example>/``; the ones the
pages show are copied to ``docs/figures/``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "docs" / "figures"

# example -> (extra flags, figures the docs use: a name, or (written as, shown as))
JOBS = {
    "train_digits": (["--no-progress"], ["loss_curves.png"]),
    "kingma_ba": ([], ["logreg.png", "bias_correction.png"]),
    "sigma_regimes": ([], ["fixed_point.png", "full_matrix.png", "quadratic.png"]),
    "uncertainty": ([], ["reliability.png", "entropy.png"]),
    "train_lm": (["--no-progress"], [("loss_curves.png", "lm_loss_curves.png")]),
}


def main(names: list[str]) -> None:
    FIGURES.mkdir(parents=True, exist_ok=True)
    for name in names or list(JOBS):
        flags, figures = JOBS[name]
        out = ROOT / "outputs" / name
        cmd = [sys.executable, str(ROOT / "examples" / f"{name}.py"), "--out", str(out), *flags]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
        for fig in figures:
            source, target = (fig, fig) if isinstance(fig, str) else fig
            shutil.copy(out / source, FIGURES / target)
            print("  ->", (FIGURES / target).relative_to(ROOT))


if __name__ == "__main__":
    main(sys.argv[1:])
