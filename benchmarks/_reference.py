"""The reference side of the benchmark: score_sde_pytorch, imported from a checkout at run time.

Nothing of the reference is copied here. Its directory (``--reference PATH`` or the environment
variable ``SCORE_SDE_PYTORCH``) is put on ``sys.path`` and its own modules are driven:
``models.ncsnpp`` (the network), ``models.utils`` (model construction, score function),
``models.ema``, ``sde_lib``, ``losses`` (training step), ``likelihood`` and ``sampling``.

One stand-in is needed. ``models/up_or_down_sampling.py`` imports the package ``op``, which
compiles CUDA kernels (FIR up/down-sampling, fused bias-activation) when it is imported. The
DDPM++ configurations use ``fir=False``, so those kernels are never called; while the reference
is imported, a small module whose functions raise takes the place of ``op`` in ``sys.modules``,
and it is removed again afterwards. The reference's ``datasets.py`` (which imports TensorFlow) is
not imported at all: its data scaler for centred data is x -> 2 x - 1, which this module applies
itself.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import os
import sys
import types
from pathlib import Path

import torch

ENV_VAR = "SCORE_SDE_PYTORCH"
CONFIG_MODULE = "configs.vp.cifar10_ddpmpp_continuous"
# names of the reference's top-level modules, which must not be shadowed by stale imports
_REFERENCE_MODULES = ("sde_lib", "losses", "likelihood", "sampling", "models", "configs")


def reference_root(path: str | None) -> Path:
    """The reference checkout: ``path``, else ``$SCORE_SDE_PYTORCH``; checked to look right."""
    root = path or os.environ.get(ENV_VAR)
    if not root:
        raise SystemExit(
            f"error: give the score_sde_pytorch checkout with --reference PATH or ${ENV_VAR} "
            "(e.g. git clone https://github.com/yang-song/score_sde_pytorch)"
        )
    root_path = Path(root).expanduser().resolve()
    if not (root_path / "models" / "ncsnpp.py").is_file():
        raise SystemExit(
            f"error: {root_path} does not look like score_sde_pytorch (no models/ncsnpp.py)"
        )
    return root_path


def _fir_kernel_unavailable(*args, **kwargs):
    raise RuntimeError(
        "the reference's CUDA FIR kernels are replaced by a stand-in in this benchmark; "
        "only fir=False (DDPM++) configurations can be measured"
    )


@contextlib.contextmanager
def _op_stand_in():
    """Temporarily register a module ``op`` whose kernels raise (see the module docstring)."""
    if "op" in sys.modules:
        yield
        return
    stand_in = types.ModuleType("op")
    stand_in.__spec__ = importlib.machinery.ModuleSpec("op", None)
    stand_in.upfirdn2d = _fir_kernel_unavailable
    stand_in.fused_leaky_relu = _fir_kernel_unavailable
    stand_in.FusedLeakyReLU = _fir_kernel_unavailable
    sys.modules["op"] = stand_in
    try:
        yield
    finally:
        if sys.modules.get("op") is stand_in:
            del sys.modules["op"]


class Reference:
    """Handles on the reference's modules and builders for the benchmark's measurements."""

    def __init__(self, root: str | Path):
        root = str(root)
        for name in _REFERENCE_MODULES:
            loaded = sys.modules.get(name)
            if loaded is not None and not str(getattr(loaded, "__file__", "")).startswith(root):
                raise RuntimeError(f"a module {name!r} not from {root} is already imported")
        if root not in sys.path:
            sys.path.insert(0, root)
        with _op_stand_in():
            self.sde_lib = importlib.import_module("sde_lib")
            self.mutils = importlib.import_module("models.utils")
            importlib.import_module("models.ncsnpp")  # registers the "ncsnpp" model
            self.ema = importlib.import_module("models.ema")
            self.losses = importlib.import_module("losses")
            self.likelihood_module = importlib.import_module("likelihood")
            self.sampling_module = importlib.import_module("sampling")
            self.configs = importlib.import_module(CONFIG_MODULE)

    def config(self, nf: int, ch_mult: tuple[int, ...], num_res_blocks: int, batch: int, device):
        """The reference's DDPM++ (cifar10, VP, continuous) config with the given width."""
        cfg = self.configs.get_config()
        cfg.model.nf = nf
        cfg.model.ch_mult = tuple(ch_mult)
        cfg.model.num_res_blocks = num_res_blocks
        cfg.training.batch_size = batch
        cfg.eval.batch_size = batch
        cfg.device = torch.device(device)
        return cfg

    def model(self, cfg, state_dict: dict | None = None) -> torch.nn.Module:
        """The reference NCSNpp (as its ``create_model`` builds it), optionally with weights."""
        model = self.mutils.create_model(cfg)
        if state_dict is not None:
            inner = model.module if hasattr(model, "module") else model
            inner.load_state_dict(state_dict, strict=True)
        return model

    def sde(self, cfg, num_scales: int | None = None):
        """The VP SDE of ``cfg`` (``num_scales`` sets N, the number of PC sampling steps)."""
        m = cfg.model
        return self.sde_lib.VPSDE(m.beta_min, m.beta_max, N=num_scales or m.num_scales)

    def train_step(self, cfg, model, lr: float, warmup: int):
        """(step(batch) -> loss, state): the reference's ``losses.get_step_fn`` training step.

        Adam, learning-rate warm-up, gradient clipping and the EMA update, exactly as the
        reference's training loop runs them.
        """
        cfg.optim.lr = lr
        cfg.optim.warmup = warmup
        optimizer = self.losses.get_optimizer(cfg, model.parameters())
        ema = self.ema.ExponentialMovingAverage(model.parameters(), decay=cfg.model.ema_rate)
        state = {"optimizer": optimizer, "model": model, "ema": ema, "step": 0}
        step_fn = self.losses.get_step_fn(
            self.sde(cfg),
            train=True,
            optimize_fn=self.losses.optimization_manager(cfg),
            reduce_mean=cfg.training.reduce_mean,
            continuous=True,
            likelihood_weighting=cfg.training.likelihood_weighting,
        )
        return (lambda batch: step_fn(state, batch)), state

    def likelihood(self, cfg, model, x, probe, rtol: float, atol: float, eps: float):
        """(bpd (B,), nfe) of the reference's ``likelihood.get_likelihood_fn`` with ``probe``.

        The reference draws its Rademacher probe with ``torch.randint_like`` inside the function;
        that one draw is answered with the given ``probe`` (+-1 mapped to {0, 1}).
        """
        fn = self.likelihood_module.get_likelihood_fn(
            self.sde(cfg),
            lambda y: (y + 1.0) / 2.0,
            hutchinson_type="Rademacher",
            rtol=rtol,
            atol=atol,
            eps=eps,
        )
        original = torch.randint_like
        used = []

        def given_probe(inp, *args, **kwargs):
            if used:
                return original(inp, *args, **kwargs)
            used.append(True)
            return ((probe + 1) / 2).to(inp.dtype)

        torch.randint_like = given_probe
        try:
            bpd, _, nfe = fn(model, x)
        finally:
            torch.randint_like = original
        if not used:
            raise RuntimeError("the reference did not draw its probe with torch.randint_like")
        return bpd, int(nfe)

    def ode_sample(self, cfg, model, z, rtol: float, atol: float, eps: float):
        """(samples in [0, 1], nfe) of the reference's probability-flow ODE sampler from ``z``."""
        sampler = self.sampling_module.get_ode_sampler(
            self.sde(cfg),
            tuple(z.shape),
            lambda y: (y + 1.0) / 2.0,
            denoise=cfg.sampling.noise_removal,
            rtol=rtol,
            atol=atol,
            eps=eps,
            device=z.device,
        )
        return sampler(model, z=z)

    def pc_sample(self, cfg, model, shape, num_steps: int, predictor: str, corrector: str, eps):
        """(samples in [0, 1], nfe) of the reference's predictor-corrector sampler."""
        sampler = self.sampling_module.get_pc_sampler(
            self.sde(cfg, num_scales=num_steps),
            tuple(shape),
            self.sampling_module.get_predictor(predictor),
            self.sampling_module.get_corrector(corrector),
            lambda y: (y + 1.0) / 2.0,
            snr=cfg.sampling.snr,
            n_steps=cfg.sampling.n_steps_each,
            probability_flow=False,
            continuous=True,
            denoise=cfg.sampling.noise_removal,
            eps=eps,
            device=cfg.device,
        )
        return sampler(model)
