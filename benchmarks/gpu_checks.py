"""Numerical checks of the training options bf16 autocast, channels_last and torch.compile.

Each option computes the denoising score matching loss and its gradient on one batch (the same
weights, images, times t and noise z) and is compared with float32 eager execution:

============================  ==========================================  =====================
option                        what it does (as in ``scoreflow.train``)     tolerance on the loss
============================  ==========================================  =====================
``channels_last``             network and inputs in channels_last memory   1e-5 relative
``compile``                   ``torch.compile`` of the network             1e-5 relative
``bf16``                      ``torch.autocast(device, torch.bfloat16)``   1e-2 relative
``bf16+channels_last+compile``  all three, as a GPU run would combine them   1e-2 relative
============================  ==========================================  =====================

The relative error of the gradient (||g - g_ref|| / ||g_ref|| over all parameters) and the time
of one forward and backward pass are reported too (not checked). The float32 reference and the
float32 options run with TF32 off (``torch.backends.cudnn.allow_tf32 = False``, matmul precision
"highest"), otherwise the reference itself would be computed at 10-bit mantissa precision.

On a machine without CUDA the checks run on the CPU: bf16 where the CPU has bf16 instructions
(``scoreflow.train`` applies every option on CPUs too), channels_last, and compile only with
``--cpu-compile``, since inductor's C++ compilation of the network takes minutes there
(benchmarks/option_checks_cpu.json: every option passed). Usage::

    python -m benchmarks.gpu_checks                       # the cifar10 DDPM++ on a GPU, or a tiny
                                                          # digits network on the CPU
    python -m benchmarks.gpu_checks --config configs/vp/cifar10_ddpmpp_continuous.py --batch 64
    python -m benchmarks.gpu_checks --no-compile --out checks.json
    python -m benchmarks.gpu_checks --device cpu --cpu-compile       # slow

Exit status 0 when every check that ran passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scoreflow import distributed, factory, losses  # noqa: E402
from scoreflow.importance import ImportanceSampler  # noqa: E402

TOLERANCE = {"float32": 0.0, "channels_last": 1e-5, "compile": 1e-5, "bf16": 1e-2}
TOLERANCE["bf16+channels_last+compile"] = 1e-2


def _fill_zero_layers(model: nn.Module, generator: torch.Generator) -> None:
    """Give the (almost) zero-initialised layers random weights: the DDPM++ output and residual
    convolutions, which ``init_scale = 0`` draws at a scale of 1e-10.

    Otherwise the loss would not depend on most of the network (it would be ||z||^2 / D whatever
    the precision) and gradients would vanish.
    """
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and float(p.abs().max()) < 1e-4:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))


class Check:
    """One batch (x, t, z) and the float32 eager model it is evaluated with."""

    def __init__(self, config, device: torch.device, batch: int, seed: int = 0):
        self.config, self.device = config, device
        training = config.training
        self.sde = factory.get_sde(config)
        self.weighting = losses.weighting_name(
            training.likelihood_weighting, training.importance_weighting
        )
        self.eps = training.smallest_time
        self.sampler = (
            ImportanceSampler(self.sde, self.eps) if self.weighting == "importance" else None
        )
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        model = factory.get_model(config)
        _fill_zero_layers(model, gen)
        self.model = model.to(device).train()
        data = config.data
        shape = (batch, data.num_channels, data.image_size, data.image_size)
        self.x = (torch.rand(shape, generator=gen) * 2 - 1).to(device)
        self.t = losses.sample_times(
            self.sde, batch, self.weighting, self.eps, gen, "cpu", torch.float32, self.sampler
        ).to(device)
        self.z = torch.randn(shape, generator=gen).to(device)

    def run(self, option: str, repeats: int) -> dict:
        """Loss, flat gradient and seconds per forward+backward of ``option``."""
        net = copy.deepcopy(self.model)
        x = self.x
        parts = option.split("+")
        if "channels_last" in parts:
            net = net.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        call: nn.Module = net
        if "compile" in parts:
            call = torch.compile(net)  # type: ignore[assignment]

        def autocast():
            if "bf16" in parts:
                return torch.autocast(self.device.type, dtype=torch.bfloat16)
            return contextlib.nullcontext()

        def step() -> Tensor:
            net.zero_grad(set_to_none=True)
            with autocast():
                loss, _ = losses.dsm_loss(
                    self.sde, call, x, self.weighting, self.eps,
                    self.config.training.reduce_mean, None, self.sampler, self.t, self.z,
                )  # fmt: skip
            loss = loss.float()
            loss.backward()
            return loss

        start = time.perf_counter()
        loss = step()  # the first call compiles
        _sync(self.device)
        first = time.perf_counter() - start
        grad = torch.cat([p.grad.flatten().double() for p in net.parameters()])
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        _sync(self.device)
        seconds = (time.perf_counter() - start) / max(repeats, 1)
        return {"loss": float(loss.detach()), "grad": grad, "seconds": seconds, "first_call": first}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="config file (default: by device)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default by device)")
    parser.add_argument("--nf", type=int, default=None, help="override model.nf")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per option")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile rows")
    parser.add_argument(
        "--cpu-compile",
        action="store_true",
        help="run the torch.compile row on the CPU too (minutes of compilation)",
    )
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    default_config = "configs/vp/cifar10_ddpmpp_continuous.py" if on_gpu else (
        "configs/small/digits_vp.py"
    )  # fmt: skip
    config = factory.load_config_file(str(ROOT / (args.config or default_config)))
    config.model.dropout = 0.0  # dropout would make two calls differ
    if args.nf:
        config.model.nf = args.nf
    elif not on_gpu and args.config is None:
        config.model.nf = 8
    batch = args.batch or (64 if on_gpu else 16)
    repeats = args.repeats if args.repeats is not None else (10 if on_gpu else 2)

    # float32 means float32: no TF32 in the reference or the float32 options
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")

    check = Check(config, device, batch)
    options = ["float32", "channels_last", "compile", "bf16", "bf16+channels_last+compile"]
    rows, failed = [], False
    reference = check.run("float32", repeats)
    for option in options:
        row = {"option": option, "device": str(device), "tolerance": TOLERANCE[option]}
        if "bf16" in option and not on_gpu and not distributed.cpu_has_bf16():
            row["status"] = "skipped (no CUDA, no bf16 instructions on this CPU)"
        elif "compile" in option and args.no_compile:
            row["status"] = "skipped (--no-compile)"
        elif "compile" in option and not on_gpu and not args.cpu_compile:
            row["status"] = "skipped (CPU; --cpu-compile to run)"
        else:
            try:
                result = reference if option == "float32" else check.run(option, repeats)
            except Exception as err:  # a missing compiler, an unsupported kernel, ...
                row["status"] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:80]}"
                failed = True
            else:
                loss_error = abs(result["loss"] - reference["loss"]) / abs(reference["loss"])
                grad_error = float(
                    (result["grad"] - reference["grad"]).norm() / reference["grad"].norm()
                )
                ok = loss_error <= TOLERANCE[option]
                failed |= not ok
                row.update(
                    loss=result["loss"],
                    loss_rel_error=loss_error,
                    grad_rel_error=grad_error,
                    ms_per_step=1e3 * result["seconds"],
                    first_call_s=result["first_call"],
                    status="pass" if ok else "FAIL",
                )
        rows.append(row)

    num_params = sum(p.numel() for p in check.model.parameters())
    print(
        f"# {type(check.model).__name__} nf={config.model.nf}, {num_params} parameters, "
        f"batch {batch} of {tuple(check.x.shape[1:])}, weighting {check.weighting}, "
        f"torch {torch.__version__}, {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if on_gpu else "")
    )
    print()
    header = "| option | loss | rel. error | tolerance | grad rel. error | ms/step | 1st call s | |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for row in rows:
        if "loss" in row:
            print(
                f"| {row['option']} | {row['loss']:.7g} | {row['loss_rel_error']:.2e} | "
                f"{row['tolerance']:.0e} | {row['grad_rel_error']:.2e} | "
                f"{row['ms_per_step']:.1f} | {row['first_call_s']:.1f} | {row['status']} |"
            )
        else:
            print(f"| {row['option']} | | | {row['tolerance']:.0e} | | | | {row['status']} |")
    if args.out:
        meta = {
            "device": str(device),
            "batch": batch,
            "nf": config.model.nf,
            "torch": torch.__version__,
        }
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
