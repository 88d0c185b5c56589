"""Side-by-side benchmark of scoreflow against score_sde_pytorch (the reference).

One command measures, for the same weights, data, batch and tolerances, ours against the
reference, alternating fresh processes (ours, reference, ours, reference, ...), and reports the
medians and their ratio:

- train:      training steps per second (DDPM++ of the cifar10 config, width set by --nf,
              --ch_mult, --num_res_blocks; loss, backward, Adam, clipping, EMA), in float32,
              and with --amp also ours with bf16 autocast (training.amp; how far bf16 moves
              the loss and gradient is checked by benchmarks/gpu_checks.py, on trained-like
              weights rather than the near-zero output of the initial ones timed here).
- likelihood: bits/dim of --lik_batches batches by the probability-flow ODE (RK45 / dopri5,
              rtol = atol = 1e-5, the same Rademacher probe on both sides), one solve per
              batch: total wall time, function evaluations,
              network forward calls, peak memory and both bits/dim values (they must agree
              within 0.01).
- ode_sample: probability-flow ODE sampling of one batch from the same prior draw: wall time
              and evaluations.
- pc_sample:  predictor-corrector sampling of one batch: wall time and evaluations.

Usage (from the repository root):

    python -m benchmarks.run --reference /path/to/score_sde_pytorch          # CPU defaults
    SCORE_SDE_PYTORCH=/path/to/score_sde_pytorch python -m benchmarks.run --tasks train
    python -m benchmarks.run --reference ... --device cuda --nf 128 --ch_mult 1,2,2,2 \\
        --num_res_blocks 4 --batch 128                                     # full width, GPU

Every measurement runs in a fresh subprocess, pinned to ``--threads`` threads, so that the two
implementations never share an allocator or a warmed-up cache and so that the peak memory of one
section can be read from the kernel: on Linux the high-water mark of the resident set is reset
(``/proc/self/clear_refs``) just before the section and read (``VmHWM``) after it; elsewhere
``resource.getrusage`` max RSS of the fresh process is used; on a GPU,
``torch.cuda.max_memory_allocated``. The CPU time that other processes used meanwhile is
recorded for every section, so that runs disturbed by other load can be recognised.

The weights are shared: the initial weights are drawn once and loaded (strictly, same
state_dict) into both networks; the likelihood and sampling measurements use weights after a
few training steps with no learning-rate warm-up, so that the probability-flow ODE is not the
trivial linear one of the zero-initialised output layers. Data: scikit-learn's 8x8 digits,
upsampled to 32x32x3 (no download needed).

Results go to a JSON file (``--out``, default benchmarks/results.json) with the machine they
came from; a markdown table is printed (and written with ``--markdown PATH``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMPLS = ("ours", "reference")
# our training step with bf16 autocast (training.amp), measured with --amp on the train task
AMP_IMPL = "ours_bf16"
TASKS = ("train", "likelihood", "ode_sample", "pc_sample")
TARGETS = {
    "train_speedup": 1.3,  # ours steps/s over the reference's, at least
    "likelihood_time_ratio": 0.5,  # ours wall time over the reference's, at most
    "likelihood_memory_ratio": 1.0,  # ours peak memory over the reference's, at most
    "bpd_abs_diff": 0.01,  # |bpd ours - bpd reference|, at most
}


# ----------------------------------------------------------------------------------------------
# measuring helpers (used inside the worker processes)
# ----------------------------------------------------------------------------------------------
class OtherLoad:
    """Fraction of all CPUs used by other processes while a section ran (Linux; else None)."""

    def __init__(self):
        self.available = os.path.exists("/proc/stat")
        self.ticks = os.sysconf("SC_CLK_TCK") if self.available else 100
        self.cpus = os.cpu_count() or 1

    def _busy_seconds(self) -> float:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
        return (user + nice + system + irq + softirq) / self.ticks

    def __enter__(self):
        self.wall0 = time.perf_counter()
        self.cpu0 = time.process_time()
        self.busy0 = self._busy_seconds() if self.available else 0.0
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0
        if not self.available or self.wall <= 0:
            self.load = None
            return
        mine = time.process_time() - self.cpu0
        self.cpu = mine
        others = self._busy_seconds() - self.busy0 - mine
        self.load = max(0.0, others) / (self.wall * self.cpus)


def _status_kib(field: str) -> int | None:
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _release_free_heap() -> None:
    """Give the C heap's free pages back to the kernel (glibc's malloc_trim), if possible.

    Memory freed by an earlier step (the warm-up pass) otherwise stays resident and is reused
    without raising the resident set, so a section's peak would depend on what ran before it.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory of a code section in MiB: GPU allocations, or the resident set on a CPU.

    CPU, Linux: the C heap's free pages are released and the kernel's high-water mark VmHWM is
    reset to the current RSS before the section, so ``peak_mib`` is the section's own peak
    (including the process's baseline,
    reported as ``baseline_mib``; ``extra_mib`` = peak - baseline). Elsewhere: getrusage max RSS.
    """

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated() / 2**20
            self.method = "torch.cuda.max_memory_allocated"
            return self
        self.method = "getrusage ru_maxrss (whole process)"
        _release_free_heap()
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
            f.write("5")
            self.method = "VmHWM after resetting it (clear_refs 5)"
        rss = _status_kib("VmRSS")
        self.baseline = rss / 1024 if rss is not None else 0.0
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            hwm = _status_kib("VmHWM") if self.method.startswith("VmHWM") else None
            if hwm is None:
                hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.peak = hwm / 1024

    def record(self) -> dict:
        return {
            "peak_mib": self.peak,
            "baseline_mib": self.baseline,
            "extra_mib": self.peak - self.baseline,
            "method": self.method,
        }


class TensorMemory:
    """Peak bytes of live CPU tensor storage while the context is active (untimed runs only).

    Every storage that an operator returns is counted from its creation until it is freed (a
    finalizer on the storage object, which PyTorch keeps alive exactly as long as the storage),
    so the figure is the tensors' own memory, free of the C heap's reuse and fragmentation that
    the resident set shows. Memory outside tensors (oneDNN scratch space, numpy arrays of a
    host-side solver) is not counted. The Python hook on every operator slows execution down,
    which is why this runs on a separate, untimed pass.
    """

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._track(out)
                return out

        self.mode = _Mode()
        self.live = self.peak = 0
        self.tracked: dict[int, int] = {}

    def _track(self, out) -> None:
        import weakref

        import torch
        from torch.utils._pytree import tree_leaves

        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in self.tracked:
                continue
            self.tracked[key] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self.tracked.pop(key, 0)

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20


def _with_tensor_peak(memory: PeakMemory, tensors: TensorMemory) -> dict:
    """The memory record with ``tensor_peak_mib``: on a GPU the allocator's own peak."""
    peak = memory.peak if memory.device.type == "cuda" else tensors.peak_mib
    return dict(memory.record(), tensor_peak_mib=peak)


class CallCounter:
    """Counts forward calls of a module (works for both networks)."""

    def __init__(self, module):
        inner = module.module if hasattr(module, "module") else module
        self.calls = 0
        self.handle = inner.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.calls += 1

    def close(self):
        self.handle.remove()


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# the worker: one measurement of one implementation in this (fresh) process
# ----------------------------------------------------------------------------------------------
class Side:
    """Uniform handle on one implementation: config, model, SDE-level operations."""

    def __init__(self, impl: str, spec: dict):
        import torch

        self.impl = impl
        self.device = torch.device(spec["device"])
        args = (spec["nf"], tuple(spec["ch_mult"]), spec["num_res_blocks"], spec["batch"])
        if impl in ("ours", AMP_IMPL):
            sys.path.insert(0, str(REPO))
            from benchmarks import _ours

            self.mod = _ours
            self.cfg = _ours.config(*args, self.device)
            self.cfg.training.amp = impl == AMP_IMPL
        else:
            from benchmarks._reference import Reference

            self.mod = Reference(spec["reference"])
            self.cfg = self.mod.config(*args, self.device)

    def model(self, state_dict):
        net = self.mod.model(self.cfg, state_dict)
        return net.to(self.device)


def _warm_up(net, x, device):
    """One forward and backward pass at the measured shape (first-call costs out of timing)."""
    import torch

    t = torch.full((x.shape[0],), 500.0, device=device)
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        net(x, t).sum().backward()
    net.zero_grad(set_to_none=True)
    _sync(device)


def worker(task: str, impl: str, spec: dict) -> dict:
    """Run one measurement and return its record (plain JSON types)."""
    import torch

    torch.set_num_threads(spec["threads"])
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    torch.manual_seed(spec["seed"])
    side = Side(impl, spec)
    device = side.device
    data = torch.load(spec["data"], map_location=device, weights_only=True)
    record: dict = {"task": task, "impl": impl, "threads": torch.get_num_threads()}

    if task == "prep":
        # the shared weights: initial, and after a few steps without warm-up
        state = torch.load(spec["init"], weights_only=True) if Path(spec["init"]).exists() else None
        net = side.model(state)
        inner = net.module if hasattr(net, "module") else net
        if state is None:
            torch.save({k: v.cpu() for k, v in inner.state_dict().items()}, spec["init"])
        step, _ = side.mod.train_step(side.cfg, net, lr=spec["prep_lr"], warmup=0)
        losses = [
            float(step(data["train"][i % len(data["train"])])) for i in range(spec["prep_steps"])
        ]
        torch.save({k: v.cpu() for k, v in inner.state_dict().items()}, spec["trained"])
        record.update(losses=losses, params=sum(p.numel() for p in inner.parameters()))
        return record

    if task == "train":
        net = side.model(torch.load(spec["init"], weights_only=True))
        step, _ = side.mod.train_step(
            side.cfg, net, lr=side.cfg.optim.lr, warmup=side.cfg.optim.warmup
        )
        batches = data["train"]
        times, cpu_times, loads, losses = [], [], [], []
        total = spec["train_warmup"] + spec["train_steps"]
        with PeakMemory(device) as memory:
            for i in range(total):
                batch = batches[i % len(batches)]
                with OtherLoad() as load:
                    loss = float(step(batch))  # float() waits for the step to finish
                if i >= spec["train_warmup"]:
                    times.append(load.wall)
                    cpu_times.append(load.cpu)
                    loads.append(load.load)
                    losses.append(loss)
        with TensorMemory() as tensors:  # one more step, untimed
            step(batches[total % len(batches)])
        median = statistics.median(times)
        record.update(
            step_s=times,
            step_cpu_s=cpu_times,
            median_step_cpu_s=statistics.median(cpu_times),
            steps_per_cpu_s=1.0 / statistics.median(cpu_times),
            other_load=loads,
            losses=losses,
            median_step_s=median,
            steps_per_s=1.0 / median,
            memory=_with_tensor_peak(memory, tensors),
        )
        return record

    net = side.model(torch.load(spec["trained"], weights_only=True))
    counter = CallCounter(net)
    if task == "likelihood":
        # several batches, one solve each: a single solve's evaluation count moves by several
        # per cent with the last bits of its arithmetic
        batch, count = spec["lik_batch"], spec["lik_batches"]
        x, probe = data["lik_x"], data["lik_probe"]
        if x.shape[0] < batch * count:
            raise SystemExit(
                f"the inputs in {spec['data']} hold {x.shape[0]} likelihood images, fewer than "
                f"{count} batches of {batch}: use a new --workdir"
            )
        # warm-up: the measured function itself on a loose tolerance (few evaluations), so that
        # first-call costs and caches of its own code paths are out of the measurement; it also
        # gives the peak tensor memory (the same for every evaluation whatever the tolerance)
        with TensorMemory() as tensors:
            side.mod.likelihood(
                side.cfg, net, x[:batch], probe[:batch], 1e-1, 1e-1, spec["lik_eps"]
            )
        counter.calls = 0
        values, nfe = [], 0
        with PeakMemory(device) as memory, OtherLoad() as load:
            for i in range(count):
                rows = slice(i * batch, (i + 1) * batch)
                bpd_i, nfe_i = side.mod.likelihood(
                    side.cfg, net, x[rows], probe[rows], spec["rtol"], spec["atol"],
                    spec["lik_eps"],
                )  # fmt: skip
                values.append(bpd_i)
                nfe += nfe_i
            _sync(device)
        bpd = torch.cat(values)
        record.update(
            wall_s=load.wall,
            cpu_s=load.cpu,
            other_load=load.load,
            nfe=nfe,
            forward_calls=counter.calls,
            s_per_nfe=load.wall / max(nfe, 1),
            bpd=[float(b) for b in bpd.flatten()],
            bpd_mean=float(bpd.mean()),
            memory=_with_tensor_peak(memory, tensors),
        )
    elif task == "ode_sample":
        z = data["sample_z"]
        _warm_up(net, z, device)
        counter.calls = 0
        with PeakMemory(device) as memory, OtherLoad() as load:
            samples, nfe = side.mod.ode_sample(
                side.cfg, net, z, spec["rtol"], spec["atol"], spec["sample_eps"]
            )
            _sync(device)
        record.update(
            wall_s=load.wall,
            cpu_s=load.cpu,
            other_load=load.load,
            nfe=int(nfe),
            forward_calls=counter.calls,
            sample_mean=float(samples.float().mean()),
            memory=memory.record(),
        )
    elif task == "pc_sample":
        shape = tuple(data["sample_z"].shape)
        _warm_up(net, data["sample_z"], device)
        counter.calls = 0
        with PeakMemory(device) as memory, OtherLoad() as load:
            samples, nfe = side.mod.pc_sample(
                side.cfg,
                net,
                shape,
                spec["pc_steps"],
                spec["predictor"],
                spec["corrector"],
                spec["sample_eps"],
            )
            _sync(device)
        record.update(
            wall_s=load.wall,
            cpu_s=load.cpu,
            other_load=load.load,
            nfe=int(nfe),
            forward_calls=counter.calls,
            sample_mean=float(samples.float().mean()),
            memory=memory.record(),
        )
    else:
        raise ValueError(f"unknown task {task!r}")
    counter.close()
    return record


# ----------------------------------------------------------------------------------------------
# the driver: shared inputs, alternating subprocesses, summary
# ----------------------------------------------------------------------------------------------
def digits_uint8(size: int):
    """scikit-learn's 1797 8x8 digits as uint8 (N, 3, size, size) (bilinear upsampling)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    try:
        from sklearn.datasets import load_digits

        images = torch.from_numpy(load_digits().images.astype(np.float32) / 16.0)[:, None]
    except ImportError:  # random images: the timings hold, the ODE is less typical
        images = torch.rand(512, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1)


def make_inputs(path: Path, args) -> None:
    """Training batches, the likelihood batch with its probe, and the prior draw, to ``path``."""
    import torch

    gen = torch.Generator().manual_seed(args.seed)
    images = digits_uint8(32)
    # the preparation cycles through these batches: a long one does not need more of them
    n_train = max(args.train_warmup + args.train_steps, min(args.prep_steps, 256))
    train = []
    for _ in range(n_train):
        idx = torch.randint(0, len(images), (args.batch,), generator=gen)
        x = images[idx].float() / 255.0
        flip = torch.rand(args.batch, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        train.append(x * 2 - 1)
    num_lik = args.lik_batch * args.lik_batches
    lik_u8 = images[torch.randperm(len(images), generator=gen)[:num_lik]].float()
    lik_x = (lik_u8 + torch.rand(lik_u8.shape, generator=gen)) / 256.0 * 2 - 1
    probe = (torch.rand(lik_x.shape, generator=gen) < 0.5).float() * 2 - 1
    z = torch.randn((args.sample_batch, 3, 32, 32), generator=gen)
    torch.save(
        {"train": torch.stack(train), "lik_x": lik_x, "lik_probe": probe, "sample_z": z}, path
    )


def run_worker(task: str, impl: str, spec: dict, workdir: Path) -> dict:
    """Run one measurement in a fresh Python process pinned to ``spec['threads']`` threads."""
    out = workdir / f"{task}_{impl}_{time.monotonic_ns()}.json"
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(spec["threads"])
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "benchmarks.run", "--worker", task, "--impl", impl]
    cmd += ["--spec", json.dumps(spec), "--worker_out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        return {"task": task, "impl": impl, "error": "\n".join(tail)}
    record = json.loads(out.read_text())
    record["process_max_rss_mib"] = record.get("process_max_rss_mib")
    return record


def machine_info(device: str, threads: int) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads_per_process": threads,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "load_average_at_start": os.getloadavg(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _median(records: list[dict], key: str):
    values = [r[key] for r in records if key in r and r[key] is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict]) -> dict:
    """Medians per implementation and task, ratios ours / reference, targets met."""
    summary: dict = {}
    for task in TASKS:
        per = {
            impl: [r for r in runs if r["task"] == task and r["impl"] == impl and "error" not in r]
            for impl in IMPLS + (AMP_IMPL,)
        }
        if not per["ours"] and not per["reference"]:
            continue
        entry: dict = {}
        for impl, records in per.items():
            if not records:
                continue
            e: dict = {"runs": len(records)}
            if task == "train":
                e["steps_per_s"] = _median(records, "steps_per_s")
                e["median_step_s"] = _median(records, "median_step_s")
                e["steps_per_cpu_s"] = _median(records, "steps_per_cpu_s")
                e["max_other_load"] = max(
                    (
                        max((v for v in r["other_load"] if v is not None), default=0)
                        for r in records
                    ),
                    default=None,
                )
            else:
                e["wall_s"] = _median(records, "wall_s")
                e["cpu_s"] = _median(records, "cpu_s")
                e["nfe"] = _median(records, "nfe")
                e["forward_calls"] = _median(records, "forward_calls")
                e["max_other_load"] = max((r["other_load"] or 0) for r in records)
            e["peak_mib"] = statistics.median(r["memory"]["peak_mib"] for r in records)
            tensor_peaks = [r["memory"].get("tensor_peak_mib") for r in records]
            tensor_peaks = [v for v in tensor_peaks if v is not None]
            e["tensor_peak_mib"] = statistics.median(tensor_peaks) if tensor_peaks else None
            e["extra_mib"] = statistics.median(r["memory"]["extra_mib"] for r in records)
            if task == "likelihood":
                e["bpd"] = records[-1]["bpd"]
                e["bpd_mean"] = records[-1]["bpd_mean"]
                e["s_per_nfe"] = _median(records, "s_per_nfe")
            entry[impl] = e
        if per["ours"] and per["reference"]:
            o, r = entry["ours"], entry["reference"]
            if task == "train":
                entry["speedup"] = o["steps_per_s"] / r["steps_per_s"]
                entry["speedup_cpu_time"] = o["steps_per_cpu_s"] / r["steps_per_cpu_s"]
                entry["target_met"] = entry["speedup"] >= TARGETS["train_speedup"]
                if per[AMP_IMPL]:
                    a = entry[AMP_IMPL]
                    entry["speedup_bf16"] = a["steps_per_s"] / r["steps_per_s"]
                    entry["speedup_bf16_cpu_time"] = a["steps_per_cpu_s"] / r["steps_per_cpu_s"]
                    entry["target_met_bf16"] = entry["speedup_bf16"] >= TARGETS["train_speedup"]
            else:
                entry["time_ratio"] = o["wall_s"] / r["wall_s"]
                entry["cpu_time_ratio"] = o["cpu_s"] / r["cpu_s"]
                entry["nfe_ratio"] = o["nfe"] / r["nfe"]
                entry["memory_ratio"] = o["peak_mib"] / r["peak_mib"]
                entry["extra_memory_ratio"] = o["extra_mib"] / max(r["extra_mib"], 1e-9)
                if o.get("tensor_peak_mib") and r.get("tensor_peak_mib"):
                    entry["tensor_memory_ratio"] = o["tensor_peak_mib"] / r["tensor_peak_mib"]
            if task == "likelihood":
                diffs = [abs(a - b) for a, b in zip(o["bpd"], r["bpd"], strict=True)]
                entry["bpd_max_abs_diff"] = max(diffs)
                entry["bpd_agree"] = entry["bpd_max_abs_diff"] <= TARGETS["bpd_abs_diff"]
                entry["time_target_met"] = entry["time_ratio"] <= TARGETS["likelihood_time_ratio"]
                # judged on the tensors' memory (on a GPU the allocator's peak); the resident set
                # of a CPU process is shown too, but mixes in the heap's history and imports
                ratio = entry.get("tensor_memory_ratio", entry["memory_ratio"])
                entry["memory_target_met"] = ratio <= TARGETS["likelihood_memory_ratio"]
        summary[task] = entry
    return summary


def _fmt(v, spec=".3g"):
    return "n/a" if v is None else format(v, spec)


def markdown_table(summary: dict) -> str:
    """The results table: measure, ours, reference, ratio, target, met?"""
    rows = [
        "| measure | ours | reference | ratio (ours / ref) | target | met? |",
        "|---|---|---|---|---|---|",
    ]

    def row(name, o, r, ratio, target="", met=None):
        mark = "" if met is None else ("yes" if met else "no")
        rows.append(f"| {name} | {o} | {r} | {ratio} | {target} | {mark} |")

    for task, e in summary.items():
        o, r = e.get("ours", {}), e.get("reference", {})
        if task == "train":
            row(
                "training steps/s",
                _fmt(o.get("steps_per_s")),
                _fmt(r.get("steps_per_s")),
                _fmt(e.get("speedup")),
                ">= 1.3",
                e.get("target_met"),
            )
            if AMP_IMPL in e:
                row(
                    "training steps/s, ours with bf16 autocast (training.amp)",
                    _fmt(e[AMP_IMPL].get("steps_per_s")),
                    _fmt(r.get("steps_per_s")),
                    _fmt(e.get("speedup_bf16")),
                    ">= 1.3",
                    e.get("target_met_bf16"),
                )
            row(
                "training steps per CPU-second",
                _fmt(o.get("steps_per_cpu_s")),
                _fmt(r.get("steps_per_cpu_s")),
                _fmt(e.get("speedup_cpu_time")),
                "",
                None,
            )
            row(
                "training peak tensor memory (MiB)",
                _fmt(o.get("tensor_peak_mib"), ".1f"),
                _fmt(r.get("tensor_peak_mib"), ".1f"),
                "",
            )
            row(
                "training peak resident set (MiB)",
                _fmt(o.get("peak_mib"), ".0f"),
                _fmt(r.get("peak_mib"), ".0f"),
                "",
            )
            continue
        label = {
            "likelihood": "ODE bits/dim",
            "ode_sample": "ODE sampling",
            "pc_sample": "PC sampling",
        }[task]
        time_target = "<= 0.5" if task == "likelihood" else ""
        row(
            f"{label}: wall time (s)",
            _fmt(o.get("wall_s")),
            _fmt(r.get("wall_s")),
            _fmt(e.get("time_ratio")),
            time_target,
            e.get("time_target_met"),
        )
        row(
            f"{label}: CPU time (s)",
            _fmt(o.get("cpu_s")),
            _fmt(r.get("cpu_s")),
            _fmt(e.get("cpu_time_ratio")),
            "",
            None,
        )
        row(
            f"{label}: function evaluations",
            _fmt(o.get("nfe"), ".0f"),
            _fmt(r.get("nfe"), ".0f"),
            _fmt(e.get("nfe_ratio")),
        )
        row(
            f"{label}: network forward calls",
            _fmt(o.get("forward_calls"), ".0f"),
            _fmt(r.get("forward_calls"), ".0f"),
            "",
        )
        if task == "likelihood":
            row(
                f"{label}: peak tensor memory (MiB)",
                _fmt(o.get("tensor_peak_mib"), ".1f"),
                _fmt(r.get("tensor_peak_mib"), ".1f"),
                _fmt(e.get("tensor_memory_ratio")),
                "<= 1",
                e.get("memory_target_met"),
            )
            row(
                f"{label}: peak resident set (MiB)",
                _fmt(o.get("peak_mib"), ".0f"),
                _fmt(r.get("peak_mib"), ".0f"),
                _fmt(e.get("memory_ratio")),
            )
            row(
                f"{label}: resident set above its baseline (MiB)",
                _fmt(o.get("extra_mib"), ".0f"),
                _fmt(r.get("extra_mib"), ".0f"),
                _fmt(e.get("extra_memory_ratio")),
            )
            row(
                f"{label}: mean bits/dim",
                _fmt(o.get("bpd_mean"), ".4f"),
                _fmt(r.get("bpd_mean"), ".4f"),
                f"max abs diff {_fmt(e.get('bpd_max_abs_diff'), '.2e')}",
                "<= 0.01",
                e.get("bpd_agree"),
            )
    return "\n".join(rows)


def combine(paths: list[str], out: str, markdown: str | None) -> dict:
    """Merge result files: all their runs, one summary; settings and machines kept per file."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    runs = [dict(r, source=i) for i, part in enumerate(parts) for r in part["runs"]]
    summary = summarize(runs)
    results = {
        "combined_from": [
            {
                "file": str(p),
                "started": part["started"],
                "finished": part["finished"],
                "machine": part["machine"],
                "settings": part["settings"],
                "tasks": sorted({r["task"] for r in part["runs"]}),
            }
            for p, part in zip(paths, parts, strict=True)
        ],
        "machine": parts[0]["machine"],
        "targets": TARGETS,
        "summary": summary,
        "runs": runs,
    }
    Path(out).write_text(json.dumps(results, indent=1))
    table = markdown_table(summary)
    print(table)
    if markdown:
        Path(markdown).write_text(table + "\n")
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--reference", help=f"score_sde_pytorch checkout (default ${'SCORE_SDE_PYTORCH'})"
    )
    p.add_argument("--tasks", default=",".join(TASKS), help="comma list of " + ", ".join(TASKS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (both sides)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds for train")
    p.add_argument("--eval_rounds", type=int, default=2, help="alternating rounds for the others")
    p.add_argument(
        "--amp",
        action="store_true",
        help="also time our training step with bf16 autocast (training.amp); needs bf16 "
        "instructions on a CPU",
    )
    p.add_argument("--nf", type=int, default=32)
    p.add_argument("--ch_mult", default="1,2,2")
    p.add_argument("--num_res_blocks", type=int, default=2)
    p.add_argument("--batch", type=int, default=8, help="training batch")
    p.add_argument("--train_steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--train_warmup", type=int, default=3, help="untimed steps per round")
    p.add_argument(
        "--prep_steps",
        type=int,
        default=30,
        help="training steps (no warm-up) of the evaluated weights",
    )
    p.add_argument("--prep_lr", type=float, default=2e-4)
    p.add_argument("--lik_batch", type=int, default=4)
    p.add_argument("--lik_batches", type=int, default=3, help="likelihood batches per run")
    p.add_argument("--lik_eps", type=float, default=1e-5)
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--sample_batch", type=int, default=4)
    p.add_argument("--sample_eps", type=float, default=1e-3)
    p.add_argument(
        "--pc_steps", type=int, default=200, help="PC steps (the reference's N; 1000 in the paper)"
    )
    p.add_argument("--predictor", default="euler_maruyama")
    p.add_argument("--corrector", default="none")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--workdir", help="keep inputs and weights here (default: a temporary folder)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results.json"))
    p.add_argument("--markdown", help="also write the table to this file")
    p.add_argument(
        "--combine",
        nargs="+",
        metavar="JSON",
        help="instead of measuring, merge the runs of earlier result files (e.g. tasks measured "
        "separately) into --out and print their table",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--worker_out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.worker:
        record = worker(args.worker, args.impl, json.loads(args.spec))
        record["process_max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        Path(args.worker_out).write_text(json.dumps(record))
        return None

    if args.combine:
        return combine(args.combine, args.out, args.markdown)

    from benchmarks._reference import reference_root

    tasks = [t for t in args.tasks.split(",") if t]
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise SystemExit(f"error: unknown task(s) {sorted(unknown)}; choose from {TASKS}")
    root = reference_root(args.reference)
    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="scoreflow-bench-")
        workdir = Path(tmp.name)
    spec = {
        "reference": str(root),
        "device": args.device,
        "threads": args.threads,
        "nf": args.nf,
        "ch_mult": [int(v) for v in args.ch_mult.split(",")],
        "num_res_blocks": args.num_res_blocks,
        "batch": args.batch,
        "train_steps": args.train_steps,
        "train_warmup": args.train_warmup,
        "prep_steps": args.prep_steps,
        "prep_lr": args.prep_lr,
        "lik_batch": args.lik_batch,
        "lik_batches": args.lik_batches,
        "lik_eps": args.lik_eps,
        "rtol": args.rtol,
        "atol": args.atol,
        "sample_eps": args.sample_eps,
        "pc_steps": args.pc_steps,
        "predictor": args.predictor,
        "corrector": args.corrector,
        "seed": args.seed,
        "data": str(workdir / "inputs.pt"),
        "init": str(workdir / "init.pt"),
        "trained": str(workdir / "trained.pt"),
    }
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    machine = machine_info(args.device, args.threads)

    # shared inputs and weights (the reference draws the initial weights and trains them)
    (workdir / "spec.json").write_text(json.dumps(spec, indent=1))
    if not Path(spec["data"]).exists():
        make_inputs(Path(spec["data"]), args)
    prep = None
    if not Path(spec["trained"]).exists():
        prep = run_worker("prep", "reference", spec, workdir)
        if "error" in prep:
            raise SystemExit("error: preparing the shared weights failed:\n" + prep["error"])
        print(
            f"shared weights: {prep['params']:,d} parameters, {args.prep_steps} steps, loss "
            f"{prep['losses'][0]:.4f} -> {prep['losses'][-1]:.4f}",
            flush=True,
        )

    # alternate: ours, reference, ours, reference, ...
    runs = []
    for task in tasks:
        rounds = args.rounds if task == "train" else args.eval_rounds
        impls = IMPLS + ((AMP_IMPL,) if task == "train" and args.amp else ())
        for i in range(rounds):
            for impl in impls:
                t0 = time.perf_counter()
                record = run_worker(task, impl, spec, workdir)
                record["round"] = i
                runs.append(record)
                if "error" in record:
                    print(f"{task} {impl} round {i}: FAILED\n{record['error']}", flush=True)
                    continue
                brief = (
                    f"{record['steps_per_s']:.3f} steps/s"
                    if task == "train"
                    else f"{record['wall_s']:.2f} s, nfe {record['nfe']}"
                )
                print(
                    f"{task} {impl} round {i}: {brief} ({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )

    summary = summarize(runs)
    table = markdown_table(summary)
    results = {
        "started": started,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "settings": {k: v for k, v in spec.items() if k not in ("data", "init", "trained")},
        "targets": TARGETS,
        "summary": summary,
        "prep": prep,
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if tmp is not None:
        tmp.cleanup()
    return results


if __name__ == "__main__":
    main()
