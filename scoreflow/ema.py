"""Exponential moving average of a model's parameters."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class EMA:
    """Shadow copies p_ema <- decay p_ema + (1 - decay) p of every parameter, updated in place.

    The shadow lives on the parameters' device. ``state_dict`` holds plain tensors and a float,
    so it can be saved and loaded with ``torch.load(weights_only=True)``.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = float(decay)
        self.names = [name for name, _ in model.named_parameters()]
        self.shadow = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards the model's current parameters."""
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(self.shadow, params, 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters with the shadow."""
        for p, s in zip(model.parameters(), self.shadow, strict=True):
            p.copy_(s)

    def state_dict(self) -> dict[str, Tensor | float]:
        """Parameter-name -> shadow tensor, plus the decay under ``"__decay__"``."""
        state: dict[str, Tensor | float] = dict(zip(self.names, self.shadow, strict=True))
        state["__decay__"] = self.decay
        return state

    def parameters_dict(self) -> dict[str, Tensor]:
        """Parameter-name -> shadow tensor: a state dict of the averaged weights (no buffers)."""
        return dict(zip(self.names, self.shadow, strict=True))

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor | float]) -> None:
        """Copy the shadows of a :meth:`state_dict` into this EMA (the decay stays as built).

        Raises KeyError naming the parameters the state lacks, and RuntimeError when a shadow's
        shape differs from the state's.
        """
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"EMA state lacks parameters: {missing[:5]}")
        for name, s in zip(self.names, self.shadow, strict=True):
            s.copy_(state[name])
