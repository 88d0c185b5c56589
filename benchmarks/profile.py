"""Where the time goes: network passes of both implementations, and operator profiles of ours.

Measures, for the same weights and inputs, in one process pinned to ``--threads`` threads:

- forward:      one network forward pass without gradient (the floor of any function
                evaluation of the ODE: every evaluation needs at least this);
- forward+vjp:  one forward pass and one vector-Jacobian product in x, which is what one
                function evaluation of the likelihood ODE with a Hutchinson probe costs when
                the drift and the divergence share the pass (the reference makes a second,
                gradient-free forward pass for the drift); again with our network's weights
                frozen, as our evaluation runs it;
- likelihood fn eval: our likelihood ODE right-hand side (score, divergence, SDE terms);
- train step:   one full training step (loss, backward, clipping, Adam, EMA).

Times are medians over ``--repeats`` calls of the process's CPU time (with one thread this is
the wall time of a quiet machine, and it hardly changes when other processes compete for the
cores), ours and reference interleaved. With
``--profile`` the torch.profiler table (self CPU time per operator) of our likelihood function
evaluation and of our training step is printed as well.

    python -m benchmarks.profile --reference /path/to/score_sde_pytorch [--profile]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reference")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--nf", type=int, default=32)
    p.add_argument("--ch_mult", default="1,2,2")
    p.add_argument("--num_res_blocks", type=int, default=2)
    p.add_argument("--batch", type=int, default=4, help="batch of the likelihood passes")
    p.add_argument("--train_batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables of ours")
    p.add_argument("--json_out")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO))
    from benchmarks import _ours
    from benchmarks._reference import Reference, reference_root

    ref = Reference(reference_root(args.reference))
    shape = (args.nf, tuple(int(v) for v in args.ch_mult.split(",")), args.num_res_blocks)
    torch.manual_seed(0)
    cfg_r = ref.config(*shape, args.train_batch, "cpu")
    cfg_o = _ours.config(*shape, args.train_batch, "cpu")
    cfg_r.model.init_scale = cfg_o.model.init_scale = 0.1  # a non-trivial output layer
    net_r = ref.model(cfg_r)
    state = {k: v.clone() for k, v in net_r.module.state_dict().items()}
    net_o = _ours.model(cfg_o, state)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, 32, 32, generator=gen)
    probe = (torch.rand(x.shape, generator=gen) < 0.5).float() * 2 - 1
    labels = torch.full((args.batch,), 300.0)
    train_x = torch.rand(args.train_batch, 3, 32, 32, generator=gen) * 2 - 1

    def forward(net):
        def run():
            with torch.no_grad():
                net(x, labels)

        return run

    def forward_vjp(net):
        def run():
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                out = net(xg, labels)
                torch.autograd.grad(out, xg, probe)

        return run

    # our evaluation freezes the score model (scoreflow.evaluate), which spares the activations
    # that only weight gradients need; the reference's keeps requires_grad on
    frozen_o = copy.deepcopy(net_o).eval().requires_grad_(False)

    def likelihood_rhs_ours():
        from scoreflow import likelihood as lik
        from scoreflow.score import get_score_fn

        sde = _ours.sde(cfg_o)
        score_fn = get_score_fn(sde, frozen_o)
        t = torch.full((args.batch,), 0.3)

        def run():
            lik._score_and_divergence(score_fn, x, t, probe)

        return run

    def likelihood_rhs_reference():
        mutils = ref.mutils
        sde = ref.sde(cfg_r)
        t = torch.full((args.batch,), 0.3)
        score_fn = mutils.get_score_fn(sde, net_r, train=False, continuous=True)
        rsde = sde.reverse(score_fn, probability_flow=True)

        def drift(xx, tt):
            return rsde.sde(xx, tt)[0]

        def run():
            with torch.no_grad():
                drift(x, t)
                with torch.enable_grad():
                    xg = x.detach().requires_grad_(True)
                    out = torch.sum(drift(xg, t) * probe)
                    g = torch.autograd.grad(out, xg)[0]
                (g * probe).sum(dim=(1, 2, 3))

        return run

    net_o.eval()
    net_r.eval()
    cases = {
        "forward": (forward(net_o), forward(net_r)),
        "forward+vjp": (forward_vjp(net_o), forward_vjp(net_r)),
        "forward+vjp, ours frozen": (forward_vjp(frozen_o), forward_vjp(net_r)),
        "likelihood fn eval": (likelihood_rhs_ours(), likelihood_rhs_reference()),
    }
    report: dict = {"threads": args.threads, "batch": args.batch, "model": shape}
    for name, (ours, reference) in cases.items():
        ours(), reference()  # warm-up
        t_o, t_r = [], []
        for _ in range(args.repeats):
            t_o.append(_median_time(ours, 1))
            t_r.append(_median_time(reference, 1))
        report[name] = {"ours_s": statistics.median(t_o), "reference_s": statistics.median(t_r)}

    step_o, _ = _ours.train_step(cfg_o, net_o, lr=2e-4, warmup=0)
    step_r, _ = ref.train_step(cfg_r, net_r, lr=2e-4, warmup=0)
    for _ in range(2):
        float(step_o(train_x)), float(step_r(train_x))
    t_o, t_r = [], []
    for _ in range(args.repeats):
        t_o.append(_median_time(lambda: float(step_o(train_x)), 1))
        t_r.append(_median_time(lambda: float(step_r(train_x)), 1))
    report["train step"] = {"ours_s": statistics.median(t_o), "reference_s": statistics.median(t_r)}

    report_rows = list(cases) + ["train step"]
    floor_o, floor_r = report["forward"]["ours_s"], report["forward"]["reference_s"]
    print(f"{'measure':<22} {'ours (ms)':>10} {'ref (ms)':>10} {'ours/ref':>9} "
          f"{'ours/fwd':>9} {'ref/fwd':>9}")  # fmt: skip
    for name in report_rows:
        o, r = report[name]["ours_s"], report[name]["reference_s"]
        print(
            f"{name:<22} {1e3 * o:10.1f} {1e3 * r:10.1f} {o / r:9.2f} "
            f"{o / floor_o:9.2f} {r / floor_r:9.2f}"
        )

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        run = likelihood_rhs_ours()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                run()
        print("\nours, likelihood function evaluation (3 calls):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
        net_r.eval()
        run = likelihood_rhs_reference()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                run()
        print("\nreference, likelihood function evaluation (3 calls):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
        net_o.train()  # dropout on, as in the timed steps above (the reference sets its own)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                float(step_o(train_x))
        print("\nours, training step (3 steps):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                float(step_r(train_x))
        print("\nreference, training step (3 steps):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
