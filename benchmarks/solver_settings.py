"""Function evaluations and errors of the likelihood ODE's solver settings.

For each combination of ``time_variable`` (t, sqrt) and ``error_norm`` (joint, separate) of
:func:`scoreflow.likelihood.ode_likelihood` at rtol = atol = 1e-5, measures the number of
function evaluations and the largest bits/dim error over a batch, against an independent answer:

- gaussian: data N(mu, diag(var)) with D = 3072 and variances log-uniform on [5e-6, 0.5] (the
  scale of dequantisation noise up to that of pixels), VP (eps 1e-5) and subVP (eps 1e-2), in
  float32 and float64. The exact score is known, the Rademacher probe is exact for its diagonal
  Jacobian, and the model's log-density has a closed form.
- network (with ``--workdir`` of ``benchmarks.run``, which holds ``trained.pt`` and
  ``inputs.pt``): the benchmark's DDPM++ on its likelihood batch and probe, in float32; the answer
  is the same ODE solved in float64 at rtol = atol = 1e-7 (minutes per solve on a CPU).

    python -m benchmarks.solver_settings [--workdir DIR] [--out benchmarks/solver_settings.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
COMBINATIONS = [("t", "joint"), ("t", "separate"), ("sqrt", "joint"), ("sqrt", "separate")]


def _bpd_error(logp, exact, dim: int) -> float:
    return float(((logp.double() - exact) / (dim * math.log(2))).abs().max())


def gaussian_cases(dim: int = 3072, batch: int = 4, tol: float = 1e-5) -> list[dict]:
    """Every combination on Gaussian data, VP and subVP, float32 and float64."""
    from scoreflow.likelihood import ode_likelihood
    from scoreflow.score import exact_gaussian_flow_logp, exact_gaussian_score_fn
    from scoreflow.sde import VPSDE, SubVPSDE

    rows = []
    gen = torch.Generator().manual_seed(0)
    for sde, eps in ((VPSDE(), 1e-5), (SubVPSDE(), 1e-2)):
        log_var = torch.empty(dim, dtype=torch.float64).uniform_(
            math.log(5e-6), math.log(0.5), generator=gen
        )
        var = log_var.exp()
        mu = 0.5 * torch.randn(dim, generator=gen, dtype=torch.float64)
        x = mu + torch.randn(batch, dim, generator=gen, dtype=torch.float64) * var.sqrt()
        exact = exact_gaussian_flow_logp(sde, mu, var, x, eps)
        for dtype in (torch.float32, torch.float64):
            score_fn = exact_gaussian_score_fn(sde, mu.to(dtype), var.to(dtype))
            for time_variable, error_norm in COMBINATIONS:
                result = ode_likelihood(
                    score_fn, sde, x.to(dtype), eps=eps, rtol=tol, atol=tol,
                    probe=torch.ones(x.shape, dtype=dtype),
                    time_variable=time_variable, error_norm=error_norm,
                )  # fmt: skip
                rows.append(
                    {
                        "problem": f"gaussian D={dim} {type(sde).__name__} eps={eps:g}",
                        "dtype": str(dtype).replace("torch.", ""),
                        "time_variable": time_variable,
                        "error_norm": error_norm,
                        "nfe": result.nfe,
                        "max_bpd_error": _bpd_error(result.logp, exact, dim),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


def network_cases(workdir: Path, tol: float = 1e-5) -> list[dict]:
    """Every combination on the benchmark's trained DDPM++, against a tight float64 solve."""
    sys.path.insert(0, str(REPO))
    from benchmarks import _ours
    from scoreflow.likelihood import ode_likelihood
    from scoreflow.score import get_score_fn

    spec = (
        json.loads((workdir / "spec.json").read_text()) if (workdir / "spec.json").is_file() else {}
    )
    shape = (
        spec.get("nf", 32),
        tuple(spec.get("ch_mult", (1, 2, 2))),
        spec.get("num_res_blocks", 2),
    )
    cfg = _ours.config(*shape, 8, torch.device("cpu"))
    net = _ours.model(cfg, torch.load(workdir / "trained.pt", weights_only=True))
    net.eval().requires_grad_(False)
    data = torch.load(workdir / "inputs.pt", weights_only=True)
    batch = spec.get("lik_batch", 4)  # the first likelihood batch of the benchmark
    x, probe = data["lik_x"][:batch], data["lik_probe"][:batch]
    sde = _ours.sde(cfg)
    dim = x[0].numel()

    def solve(model, dtype, time_variable, error_norm, rtol):
        start = time.perf_counter()
        result = ode_likelihood(
            get_score_fn(sde, model), sde, x.to(dtype), eps=1e-5, rtol=rtol, atol=rtol,
            probe=probe.to(dtype), time_variable=time_variable, error_norm=error_norm,
        )  # fmt: skip
        return result, time.perf_counter() - start

    exact, seconds = solve(net.double(), torch.float64, "t", "separate", 1e-7)
    print(f"float64 answer at 1e-7: {exact.nfe} evaluations, {seconds:.0f} s", flush=True)
    net.float()
    rows = []
    for time_variable, error_norm in COMBINATIONS:
        result, seconds = solve(net, torch.float32, time_variable, error_norm, tol)
        rows.append(
            {
                "problem": f"DDPM++ nf={shape[0]} ch_mult={shape[1]} from {workdir}",
                "dtype": "float32",
                "time_variable": time_variable,
                "error_norm": error_norm,
                "nfe": result.nfe,
                "seconds": seconds,
                "max_bpd_error": _bpd_error(result.logp, exact.logp, dim),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", help="a benchmarks.run --workdir with trained.pt and inputs.pt")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "solver_settings.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO))

    results = {"tolerance": 1e-5, "gaussian": gaussian_cases()}
    if args.workdir:
        results["network"] = network_cases(Path(args.workdir))
    Path(args.out).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
