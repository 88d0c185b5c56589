"""Process-group and device helpers: rank, world size, sharding, gathering, CPU capabilities.

Every function works without torch.distributed being initialised (one process, rank 0), so the
drivers call them unconditionally. Under ``torchrun`` the drivers call :func:`init` once, which
picks NCCL when the process has a CUDA device and gloo otherwise.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "cpu_has_bf16",
    "init",
    "destroy",
    "is_initialized",
    "rank",
    "world_size",
    "local_rank",
    "is_main",
    "barrier",
    "shard_indices",
    "all_gather_cat",
    "broadcast_object",
    "all_gather_object",
    "mean_over_ranks",
    "wrap_ddp",
    "rank_seed",
    "default_device",
]


def launched_by_torchrun() -> bool:
    """True when the environment of torchrun (or another launcher) names a multi-rank job."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device_hint: str = "auto") -> None:
    """Join the process group described by the launcher's environment, if any; else do nothing."""
    if is_initialized() or not launched_by_torchrun():
        return
    use_cuda = torch.cuda.is_available() and device_hint != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")


def destroy() -> None:
    """Leave the process group joined by :func:`init` (a no-op on one process)."""
    if is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    """Whether this process has joined a process group (torch.distributed is initialised)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the process group; 0 on one process."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of processes in the group; 1 on one process."""
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """This process's rank on its machine (torchrun's LOCAL_RANK; 0 without a launcher)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Whether this is rank 0, the process that writes files and logs."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank has reached this call (a no-op on one process)."""
    if is_initialized():
        dist.barrier()


def default_device(requested: str = "auto") -> torch.device:
    """The device to run on: ``requested`` unless "auto", then this rank's GPU or the CPU."""
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() if launched_by_torchrun() else 0)
    return torch.device("cpu")


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX instructions)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def shard_indices(n: int, rank_: int | None = None, world: int | None = None) -> range:
    """The contiguous block of ``range(n)`` that this rank owns (sizes differ by at most one)."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    base, extra = divmod(n, world)
    start = rank_ * base + min(rank_, extra)
    return range(start, start + base + (1 if rank_ < extra else 0))


def all_gather_cat(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` (first dimension may differ per rank) over ranks, in rank order."""
    if not is_initialized():
        return tensor
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([tensor.shape[0]], device=tensor.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest,) + tensor.shape[1:], dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(s.item())] for g, s in zip(gathered, sizes, strict=True)])


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a picklable object from rank ``src`` to every rank (identity on one process)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: object) -> list[object]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` on one process)."""
    if not is_initialized():
        return [obj]
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(tensor: Tensor) -> Tensor:
    """The element-wise mean of ``tensor`` over ranks (a copy; ``tensor`` itself on one process).

    For a per-rank batch mean over equal-size shards this is the mean over the global batch.
    """
    if not is_initialized():
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / world_size()


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in :class:`~torch.nn.parallel.DistributedDataParallel` under a process group.

    DDP averages the gradients over ranks during ``backward`` (an all-reduce of the buckets), so
    with equal-size shards and a loss that is a batch mean every rank ends ``backward`` holding the
    gradient of the global batch mean. On one process ``model`` is returned unchanged.
    """
    if not is_initialized():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def rank_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed that depends on ``seed`` and ``keys`` only (e.g. step and rank)."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(2)
    return (int(state[0]) << 32 | int(state[1])) & (2**63 - 1)
