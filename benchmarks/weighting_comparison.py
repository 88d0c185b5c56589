"""Does likelihood weighting with importance sampling give lower test bits/dim than the baseline?

The paper's central claim, on a model small enough for a CPU: train the same tiny DDPM++ twice
for the same number of steps through the command line, once with the baseline weighting
(lambda = std^2, t uniform) and once with likelihood weighting and importance-sampled t, then
evaluate both on the held-out split by the probability-flow ODE (uniform dequantisation) and by
the variational bound, and print a table. Run by hand::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/weighting_comparison.py \\
        --config configs/small/digits_vp.py --workdir runs/weighting --iters 3001

Each run's report lands in <workdir>/<name>/eval/report.json; the table also goes to
<workdir>/comparison.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

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
    args = parser.parse_args()

    workdir = Path(args.workdir)
    common = [f"--config.training.n_iters={args.iters}"]
    table = {}
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
            entry = report["checkpoints"][f"{snapshot}_{method}"]
            table[name][method] = {
                k: entry[k] for k in ("bpd", "bpd_stderr", "nfe_mean", "num_images", "seconds")
            }

    (workdir / "comparison.json").write_text(json.dumps(table, indent=2))
    print(f"\n{'run':<24}{'ODE bpd':>18}{'bound bpd':>18}")
    for name, row in table.items():
        ode, bound = row["ode"], row["bound"]
        print(
            f"{name:<24}{ode['bpd']:>10.3f} +- {ode['bpd_stderr']:.3f}"
            f"{bound['bpd']:>10.3f} +- {bound['bpd_stderr']:.3f}"
        )


if __name__ == "__main__":
    main()
