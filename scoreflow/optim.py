"""The optimiser of both training drivers: Adam with a linear learning-rate warm-up."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

__all__ = ["adam", "learning_rate"]

log = logging.getLogger(__name__)


def adam(
    parameters: Iterable[torch.nn.Parameter],
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> torch.optim.Adam:
    """``torch.optim.Adam`` with its fused kernel where the parameters' device has one.

    The fused update is the same algorithm as the default one in a single kernel per parameter
    group (about 3x faster per step for a few hundred tensors on a CPU); its state dict has the
    same layout, so a checkpoint written by either loads into the other. Devices without a
    fused kernel use the multi-tensor (foreach) implementation.
    """
    params = list(parameters)
    options = dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)
    try:
        return torch.optim.Adam(params, fused=True, **options)
    except (RuntimeError, ValueError) as err:  # no fused kernel for this device or dtype
        log.debug("fused Adam unavailable (%s); using the foreach implementation", err)
        return torch.optim.Adam(params, foreach=True, **options)


def learning_rate(step: int, base_lr: float, warmup: int) -> float:
    """Learning rate of update number ``step`` (1-based): base_lr min(step / warmup, 1).

    (The reference uses the count of finished updates, so its first update has rate 0.)
    """
    if warmup <= 0:
        return base_lr
    return base_lr * min(step / warmup, 1.0)
