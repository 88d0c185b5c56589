"""Our side of the benchmark: the same measurements, made with scoreflow's public functions.

Each function mirrors what scoreflow's drivers do for the same task: the training step is the
body of the loop in :func:`scoreflow.train.train` (denoising score matching loss, Adam with
learning-rate warm-up, gradient clipping, EMA), the likelihood is
:func:`scoreflow.likelihood.ode_likelihood` converted to bits/dim, and the samplers are
:func:`scoreflow.sampling.ode_sample` and :func:`scoreflow.sampling.pc_sample`.
"""

from __future__ import annotations

import torch
from torch import Tensor

# imported here, before any timed section (the reference's modules are imported up front too)
from scoreflow import factory, losses, sampling, train
from scoreflow import likelihood as lik
from scoreflow.config_defaults import cifar10_config
from scoreflow.ema import EMA
from scoreflow.importance import ImportanceSampler
from scoreflow.optim import adam, learning_rate
from scoreflow.score import get_score_fn

# the reference's predictor names -> ours
PREDICTOR_NAMES = {"ancestral_sampling": "ancestral"}


def config(nf: int, ch_mult: tuple[int, ...], num_res_blocks: int, batch: int, device):
    """Our DDPM++ (cifar10, VP, continuous) config with the given width."""

    cfg = cifar10_config("vpsde", deep=False)
    cfg.model.nf = nf
    cfg.model.ch_mult = tuple(ch_mult)
    cfg.model.num_res_blocks = num_res_blocks
    cfg.training.batch_size = batch
    cfg.device = str(device)
    return cfg


def model(cfg, state_dict: dict | None = None) -> torch.nn.Module:
    """Our NCSNpp, built by the factory, optionally with weights (the reference's layout)."""

    net = factory.get_model(cfg).to(cfg.device)
    if state_dict is not None:
        net.load_state_dict(state_dict, strict=True)
    return net


def sde(cfg):
    """The forward SDE of ``cfg``."""

    return factory.get_sde(cfg)


def train_step(cfg, net: torch.nn.Module, lr: float, warmup: int):
    """(step(batch) -> loss, state): one optimisation step as :func:`scoreflow.train.train`
    takes it, on a batch already in model space."""

    training, optim = cfg.training, cfg.optim
    forward_sde = sde(cfg)
    device = torch.device(cfg.device)
    weighting = losses.weighting_name(training.likelihood_weighting, training.importance_weighting)
    eps = training.smallest_time
    sampler = ImportanceSampler(forward_sde, eps) if weighting == "importance" else None
    ema = EMA(net, cfg.model.ema_rate)
    optimizer = adam(
        net.parameters(), lr, optim.beta1, eps=optim.eps, weight_decay=optim.weight_decay
    )
    call_model, autocast = train._device_options(cfg, net, device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed + 2)
    channels_last = training.channels_last
    state = {"step": 0, "optimizer": optimizer, "ema": ema}
    net.train()

    def step(batch: Tensor) -> Tensor:
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(state["step"] + 1, lr, warmup)
        with autocast():
            loss, _ = losses.dsm_loss(
                forward_sde,
                call_model,
                batch,
                weighting,
                eps,
                training.reduce_mean,
                generator,
                sampler,
            )
        loss = loss.float()
        if not torch.isfinite(loss):
            raise RuntimeError(f"training loss became {float(loss)}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), optim.grad_clip)
        optimizer.step()
        ema.update(net)
        state["step"] += 1
        return loss.detach()

    return step, state


def likelihood(cfg, net, x: Tensor, probe: Tensor, rtol: float, atol: float, eps: float):
    """(bpd (B,), nfe) of :func:`scoreflow.likelihood.ode_likelihood` with the probe given."""

    forward_sde = sde(cfg)
    net.eval().requires_grad_(False)  # as scoreflow.evaluate does
    result = lik.ode_likelihood(
        get_score_fn(forward_sde, net),
        forward_sde,
        x,
        eps=eps,
        rtol=rtol,
        atol=atol,
        divergence="rademacher",
        probe=probe,
    )
    dim = x[0].numel()
    bpd = lik.bits_per_dim(-result.logp, dim, lik.bpd_offset())
    return bpd, int(result.nfe)


def ode_sample(cfg, net, z: Tensor, rtol: float, atol: float, eps: float):
    """(samples in model space, nfe) of :func:`scoreflow.sampling.ode_sample` from ``z``."""

    forward_sde = sde(cfg)
    net.eval()
    with torch.no_grad():
        return sampling.ode_sample(
            get_score_fn(forward_sde, net),
            forward_sde,
            tuple(z.shape),
            eps=eps,
            rtol=rtol,
            atol=atol,
            denoise=cfg.sampling.noise_removal,
            prior_sample=z,
        )


def pc_sample(cfg, net, shape, num_steps: int, predictor: str, corrector: str, eps: float):
    """(samples in model space, nfe) of :func:`scoreflow.sampling.pc_sample`."""

    forward_sde = sde(cfg)
    net.eval()
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 3)
    with torch.no_grad():
        return sampling.pc_sample(
            get_score_fn(forward_sde, net),
            forward_sde,
            tuple(shape),
            predictor=PREDICTOR_NAMES.get(predictor, predictor),
            corrector=corrector,
            snr=cfg.sampling.snr,
            num_steps=num_steps,
            n_steps_each=cfg.sampling.n_steps_each,
            eps=eps,
            denoise=cfg.sampling.noise_removal,
            generator=generator,
            device=cfg.device,
        )
