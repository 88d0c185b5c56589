"""Does likelihood weighting with importance sampling give lower test bits/dim than the baseline?

The paper's central claim, on a model small enough for a CPU: train the same tiny DDPM++ twice
for the same number of steps through the command line, once with the baseline weighting
(lambda = std^2, t uniform) and once with likelihood weighting and importance-sampled t, then
evaluate both on the held-out split by the probability-flow ODE (uniform dequantisation) and by
the variational bound, and print a table. Run by hand::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/weighting_comparison.py \\
        --config configs/small/digits_vp.py --workdir runs/weighting --iters 3001

Each run's report lands in <workdir>/<name>/eval/report.json; the table goes to ``--out``
(default benchmarks/weighting_results.json). Both runs are evaluated on the same images with the
same dequantisation noise and estimator draws (they are seeded per image), so the table also
gives the paired difference (likelihood_importance - baseline) per image, with its standard
error, which is much smaller than the spread of either figure over images.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from scoreflow import checkpoints

RUNS = {
    "baseline": [
        "--config.training.likelihood_weighting=False",
        "--config.training.importance_weighting=False",
    ],
    "likelihood_importance": [
        "--config.training.likelihood_weighting=True",
        "--config.training.importance_weighting=True",
    ],
}


def scoreflow(args: list[str]) -> None:
    """Run the command line in a subprocess; stop on failure."""
    command = [sys.executable, "-m", "scoreflow", *args]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/small/digits_vp.py")
    parser.add_argument("--workdir", default="runs/weighting_comparison")
    parser.add_argument("--iters", type=int, default=3001, help="training steps of each run")
    parser.add_argument("--repeats", type=int, default=1, help="eval.num_repeats")
    parser.add_argument("--max_images", type=int, default=0, help="0: the whole test split")
    parser.add_argument("--out", default=str(Path(__file__).with_name("weighting_results.json")))
    args = parser.parse_args()

    workdir = Path(args.workdir)
    common = [f"--config.training.n_iters={args.iters}"]
    table = {}
    per_image = {}
    for name, flags in RUNS.items():
        run_dir = workdir / name
        start = time.time()
        scoreflow(
            ["--config", args.config, "--workdir", str(run_dir), "--mode", "train", *common, *flags]
        )
        train_seconds = time.time() - start
        snapshot = checkpoints.list_checkpoints(run_dir / "checkpoints")[-1][0]
        table[name] = {"train_seconds": train_seconds}
        for method in ("ode", "bound"):
            scoreflow(
                [
                    "--config",
                    args.config,
                    "--workdir",
                    str(run_dir),
                    "--mode",
                    "eval",
                    "--eval_folder",
                    "eval",
                    *common,
                    *flags,
                    f"--config.eval.begin_ckpt={snapshot}",
                    f"--config.eval.end_ckpt={snapshot}",
                    f"--config.eval.bound={method == 'bound'}",
                    f"--config.eval.num_repeats={args.repeats}",
                    f"--config.eval.max_images={args.max_images}",
                ]
            )
            report = json.loads((run_dir / "eval" / "report.json").read_text())
            entry = report["checkpoints"][f"{snapshot}_{method}_uniform"]
            table[name][method] = {
                k: entry[k] for k in ("bpd", "bpd_stderr", "nfe_mean", "num_images", "seconds")
            }
            arrays = np.load(run_dir / "eval" / f"bpd_ckpt_{snapshot}_{method}_uniform.npz")
            per_image[name, method] = arrays["bpd"].mean(axis=0)

    paired = {}
    for method in ("ode", "bound"):
        diff = per_image["likelihood_importance", method] - per_image["baseline", method]
        paired[method] = {
            "mean": float(diff.mean()),
            "stderr": float(diff.std(ddof=1) / math.sqrt(diff.size)),
            "fraction_of_images_lower": float((diff < 0).mean()),
        }
    results = {
        "config": args.config,
        "iters": args.iters,
        "machine": f"{platform.machine()} {platform.processor()} ({platform.node()})",
        "runs": table,
        "likelihood_importance_minus_baseline": paired,
    }
    (workdir / "comparison.json").write_text(json.dumps(results, indent=2))
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'run':<24}{'ODE bpd':>18}{'bound bpd':>18}")
    for name, row in table.items():
        ode, bound = row["ode"], row["bound"]
        print(
            f"{name:<24}{ode['bpd']:>10.3f} +- {ode['bpd_stderr']:.3f}"
            f"{bound['bpd']:>10.3f} +- {bound['bpd_stderr']:.3f}"
        )
    print(
        f"{'difference (paired)':<24}"
        + "".join(f"{paired[m]['mean']:>+10.3f} +- {paired[m]['stderr']:.3f}" for m in paired)
    )
    print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
