"""Smoke tests of the benchmark's own pieces (benchmarks/), without timing anything.

The reference checkout is not needed, except by the last test, which runs only when
``SCORE_SDE_PYTORCH`` names one.
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not installed
from benchmarks import _ours, run  # noqa: E402

TINY = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, batch=2, device="cpu")


def test_other_load_and_peak_memory_measure_a_section():
    with run.PeakMemory(torch.device("cpu")) as memory, run.OtherLoad() as load:
        # 8 MiB of fresh anonymous pages, touched (a tensor could reuse pages that earlier
        # tests left resident in the allocator)
        block = mmap.mmap(-1, 8 * 2**20)
        block.write(b"\1" * len(block))
        time.sleep(0.01)
    assert load.wall >= 0.01
    assert load.load is None or 0.0 <= load.load <= 1.0
    record = memory.record()
    assert record["peak_mib"] >= record["baseline_mib"] > 0
    if record["method"].startswith("VmHWM"):  # the section's own peak is visible on Linux
        assert record["extra_mib"] >= 7.0
    block.close()


def test_inputs_are_model_space_batches_and_a_rademacher_probe(tmp_path):
    args = argparse.Namespace(
        seed=0,
        batch=3,
        train_warmup=1,
        train_steps=2,
        prep_steps=2,
        lik_batch=2,
        lik_batches=2,
        sample_batch=2,
    )
    path = tmp_path / "inputs.pt"
    run.make_inputs(path, args)
    data = torch.load(path, weights_only=True)
    assert data["train"].shape == (3, 3, 3, 32, 32)
    assert data["train"].min() >= -1 and data["train"].max() <= 1
    assert data["lik_x"].shape == (4, 3, 32, 32)
    assert set(data["lik_probe"].unique().tolist()) <= {-1.0, 1.0}
    assert data["sample_z"].shape == (2, 3, 32, 32)


def test_our_side_trains_and_scores_a_tiny_network():
    torch.manual_seed(0)
    cfg = _ours.config(TINY["nf"], TINY["ch_mult"], TINY["num_res_blocks"], 2, "cpu")
    net = _ours.model(cfg)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    step, info = _ours.train_step(cfg, net, lr=1e-3, warmup=0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    losses = [float(step(x)) for _ in range(2)]
    assert info["step"] == 2 and all(torch.isfinite(torch.tensor(losses)))
    changed = any(not torch.equal(v, net.state_dict()[k]) for k, v in state.items())
    assert changed

    counter = run.CallCounter(net)
    probe = torch.ones_like(x)
    bpd, nfe = _ours.likelihood(cfg, net, x, probe, rtol=1e-2, atol=1e-2, eps=1e-3)
    counter.close()
    assert bpd.shape == (2,) and torch.isfinite(bpd).all()
    assert nfe >= 2 and counter.calls == nfe  # one network call per function evaluation


def test_summary_and_table_from_records():
    def train(impl, rate):
        return {
            "task": "train",
            "impl": impl,
            "steps_per_s": rate,
            "median_step_s": 1 / rate,
            "steps_per_cpu_s": rate,
            "other_load": [0.0],
            "memory": {"peak_mib": 100.0, "extra_mib": 10.0},
        }

    def lik(impl, wall, bpd):
        return {
            "task": "likelihood",
            "impl": impl,
            "wall_s": wall,
            "cpu_s": wall,
            "nfe": 10,
            "forward_calls": 10,
            "other_load": 0.0,
            "s_per_nfe": wall / 10,
            "bpd": bpd,
            "bpd_mean": sum(bpd) / len(bpd),
            "memory": {"peak_mib": 100.0, "extra_mib": 10.0},
        }

    runs = [train("ours", 2.0), train("reference", 1.0), train("ours", 2.0)]
    runs += [train(run.AMP_IMPL, 3.0)]
    runs += [lik("ours", 1.0, [3.0, 3.0]), lik("reference", 4.0, [3.0, 3.005])]
    summary = run.summarize(runs)
    assert summary["train"]["speedup"] == pytest.approx(2.0)
    assert summary["train"]["target_met"]
    assert summary["train"]["speedup_bf16"] == pytest.approx(3.0)
    assert summary["likelihood"]["time_ratio"] == pytest.approx(0.25)
    assert summary["likelihood"]["bpd_max_abs_diff"] == pytest.approx(0.005)
    assert summary["likelihood"]["bpd_agree"]
    table = run.markdown_table(summary)
    assert "| training steps/s | 2 | 1 | 2 | >= 1.3 | yes |" in table
    assert "| training steps/s, ours with bf16 autocast (training.amp) | 3 | 1 | 3 |" in table


@pytest.mark.skipif(
    not os.environ.get("SCORE_SDE_PYTORCH"), reason="no score_sde_pytorch checkout given"
)
def test_reference_side_loads_the_same_weights():
    from benchmarks._reference import Reference, reference_root

    reference = Reference(reference_root(None))
    cfg_r = reference.config(TINY["nf"], TINY["ch_mult"], TINY["num_res_blocks"], 2, "cpu")
    cfg_o = _ours.config(TINY["nf"], TINY["ch_mult"], TINY["num_res_blocks"], 2, "cpu")
    cfg_r.model.init_scale = cfg_o.model.init_scale = 0.1
    torch.manual_seed(0)
    net_r = reference.model(cfg_r).eval()
    net_o = _ours.model(cfg_o, net_r.module.state_dict()).eval()
    x, labels = torch.randn(2, 3, 32, 32), torch.tensor([10.0, 700.0])
    with torch.no_grad():
        torch.testing.assert_close(net_o(x, labels), net_r(x, labels), rtol=1e-4, atol=1e-5)
