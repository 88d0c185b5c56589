"""The drivers' optimiser: the fused Adam against torch's reference loop, and the warm-up."""

from __future__ import annotations

import copy

import pytest
import torch

from scoreflow.optim import adam, learning_rate


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 5, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()


def test_adam_matches_the_single_tensor_loop_and_its_state_loads_either_way():
    fast, slow = _model(0), _model(0)
    opt_fast = adam(fast.parameters(), 1e-2, 0.9, eps=1e-8, weight_decay=1e-3)
    opt_slow = torch.optim.Adam(
        slow.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-3,
        foreach=False,
    )  # fmt: skip
    _train(fast, opt_fast, 20)
    _train(slow, opt_slow, 20)
    for a, b in zip(fast.parameters(), slow.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    # a checkpoint of one (a copy, as from a file) continues in the other as in the first
    resumed = _model(0)
    resumed.load_state_dict(copy.deepcopy(slow.state_dict()))
    opt_resumed = adam(resumed.parameters(), 1e-2, 0.9, eps=1e-8, weight_decay=1e-3)
    opt_resumed.load_state_dict(copy.deepcopy(opt_slow.state_dict()))
    _train(resumed, opt_resumed, 5)
    _train(slow, opt_slow, 5)
    for a, b in zip(resumed.parameters(), slow.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_learning_rate_warm_up():
    assert learning_rate(1, 2e-4, 5000) == pytest.approx(2e-4 / 5000)
    assert learning_rate(2500, 2e-4, 5000) == pytest.approx(1e-4)
    assert learning_rate(10**6, 2e-4, 5000) == 2e-4
    assert learning_rate(1, 2e-4, 0) == 2e-4
