"""idm_jax.data and idm_jax.data.convert on miniature datasets written in tmp_path.

References are independent of the code under test: explicit index formulas and loops for the
CIFAR byte layout and the per-class layout, NumPy formulas for normalisation and statistics,
and files whose contents the test itself chose. Nothing here reads ../shared data or the network.
"""

import json
import os
import pickle
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from idm_jax.data import convert
from idm_jax import data
from idm_jax.data import core

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rand_u8(rng, *shape):
    return rng.integers(0, 256, shape, dtype=np.uint8)


# ----------------------------------------------------------------------------- NumPy directory


def _write_npy_dir(path, train_chunks, train_y, test_x, test_y, meta=None, class_names=None):
    os.makedirs(path, exist_ok=True)
    for k, chunk in train_chunks.items():
        np.save(os.path.join(path, f"train_x_{k}.npy"), chunk)
    np.save(os.path.join(path, "train_y.npy"), np.asarray(train_y))
    np.save(os.path.join(path, "test_x.npy"), test_x)
    np.save(os.path.join(path, "test_y.npy"), np.asarray(test_y))
    if meta is not None:
        with open(os.path.join(path, "meta.json"), "w") as f:
            json.dump(meta, f)
    if class_names is not None:
        with open(os.path.join(path, "class_names.txt"), "w") as f:
            f.write("\n".join(class_names) + "\n")
    return str(path)


def test_npy_two_chunks_joined_in_order(tmp_path):
    rng = np.random.default_rng(0)
    c0, c1 = _rand_u8(rng, 3, 4, 4, 3), _rand_u8(rng, 4, 4, 4, 3)
    train_y = np.array([0, 1, 2, 0, 1, 2, 2], np.int64)  # int64 on disk, as the shared copy
    test_x, test_y = _rand_u8(rng, 2, 4, 4, 3), np.array([2, 0], np.int64)
    meta = {"name": "cifar10", "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "num_classes": 3}
    d = _write_npy_dir(tmp_path / "d", {0: c0, 1: c1}, train_y, test_x, test_y, meta,
                       ["a", "b", "c"])
    ds = data.load_dataset("cifar10", source="npy", data_dir=d)
    np.testing.assert_array_equal(ds.train_images[:3], c0)
    np.testing.assert_array_equal(ds.train_images[3:], c1)
    np.testing.assert_array_equal(ds.test_images, test_x)
    assert ds.train_labels.dtype == np.int32 and ds.test_labels.dtype == np.int32
    np.testing.assert_array_equal(ds.train_labels, train_y)
    assert ds.class_names == ("a", "b", "c") and ds.num_classes == 3
    assert ds.mean == (0.1, 0.2, 0.3) and ds.std == (0.4, 0.5, 0.6)
    assert ds.image_shape == (4, 4, 3)


def test_npy_chunk_order_is_numeric_not_lexicographic(tmp_path):
    # 12 one-row chunks whose pixels hold the chunk number: train_x_10 must follow train_x_9.
    chunks = {k: np.full((1, 2, 2, 1), k, np.uint8) for k in [11, 3, 10, 0, 9, 1, 2, 4, 5, 6, 7, 8]}
    d = _write_npy_dir(tmp_path / "d", chunks, np.arange(12) % 10, np.zeros((1, 2, 2, 1), np.uint8),
                       [0])
    ds = data.load_dataset("mnist", source="npy", data_dir=d)
    np.testing.assert_array_equal(ds.train_images[:, 0, 0, 0], np.arange(12))
    # No meta.json / class_names.txt: constants and names come from DATASET_INFO.
    assert ds.mean == (0.1307,) and ds.std == (0.3081,)
    assert ds.class_names == tuple("0123456789")


def test_npy_single_file_and_unknown_name_with_meta(tmp_path):
    rng = np.random.default_rng(1)
    x = _rand_u8(rng, 5, 3, 3, 2)
    d = str(tmp_path / "d")
    os.makedirs(d)
    np.save(os.path.join(d, "train_x.npy"), x)
    np.save(os.path.join(d, "train_y.npy"), np.array([0, 1, 0, 1, 1]))
    np.save(os.path.join(d, "test_x.npy"), x[:2])
    np.save(os.path.join(d, "test_y.npy"), np.array([1, 0]))
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump({"name": "emnist/letters", "mean": [0.5, 0.5], "std": [0.25, 0.25]}, f)
    ds = data.load_dataset("emnist/letters", source="npy", data_dir=d)
    np.testing.assert_array_equal(ds.train_images, x)
    assert ds.num_classes == 2 and ds.class_names == ("0", "1")
    # name=None is allowed through load_npy_dir when meta.json names the dataset.
    assert data.load_npy_dir(d).name == "emnist/letters"


def _good_npy_dir(path):
    rng = np.random.default_rng(2)
    return _write_npy_dir(path, {0: _rand_u8(rng, 2, 4, 4, 3), 1: _rand_u8(rng, 2, 4, 4, 3)},
                          [0, 1, 2, 3], _rand_u8(rng, 2, 4, 4, 3), [0, 1])


@pytest.mark.parametrize("breakage, expected", [
    ("missing_labels", "train_y.npy"),
    ("float_chunk", "train_x_1.npy"),
    ("three_d_chunk", "train_x_1.npy"),
    ("other_hwc", "train_x_1.npy"),
    ("gap", "train_x_1.npy"),
    ("both_forms", "both"),
    ("label_length", "train_y.npy"),
    ("float_labels", "integer labels"),
    ("label_range", "gives 10 classes, but the labels"),
    ("meta_other_name", "cifar100"),
    ("missing_test", "test_x"),
])
def test_npy_errors_name_the_problem(tmp_path, breakage, expected):
    d = _good_npy_dir(tmp_path / "d")
    p = lambda name: os.path.join(d, name)  # noqa: E731
    if breakage == "missing_labels":
        os.remove(p("train_y.npy"))
    elif breakage == "float_chunk":
        np.save(p("train_x_1.npy"), np.zeros((2, 4, 4, 3), np.float32))
    elif breakage == "three_d_chunk":
        np.save(p("train_x_1.npy"), np.zeros((2, 4, 12), np.uint8))
    elif breakage == "other_hwc":
        np.save(p("train_x_1.npy"), np.zeros((2, 5, 4, 3), np.uint8))
    elif breakage == "gap":
        os.rename(p("train_x_1.npy"), p("train_x_2.npy"))
    elif breakage == "both_forms":
        np.save(p("train_x.npy"), np.zeros((4, 4, 4, 3), np.uint8))
    elif breakage == "label_length":
        np.save(p("train_y.npy"), np.zeros(5, np.int64))
    elif breakage == "float_labels":
        np.save(p("train_y.npy"), np.zeros(4, np.float32))
    elif breakage == "label_range":
        np.save(p("train_y.npy"), np.array([0, 1, 2, 10]))
    elif breakage == "meta_other_name":
        with open(p("meta.json"), "w") as f:
            json.dump({"name": "cifar100"}, f)
    elif breakage == "missing_test":
        os.remove(p("test_x.npy"))
    with pytest.raises(ValueError, match=expected):
        data.load_dataset("cifar10", source="npy", data_dir=d)


def test_npy_unknown_name_without_meta_is_rejected(tmp_path):
    d = _good_npy_dir(tmp_path / "d")
    with pytest.raises(ValueError, match="Unknown dataset 'nope'.*cifar10"):
        data.load_dataset("nope", source="npy", data_dir=d)


# ----------------------------------------------------------------------------- CIFAR pickles


def _cifar_rows(rng, n):
    return _rand_u8(rng, n, 3072)


def _expected_nhwc(rows):
    """Pixel (h, w, channel c) of an official row sits at byte c*1024 + h*32 + w."""
    h, w, c = np.meshgrid(np.arange(32), np.arange(32), np.arange(3), indexing="ij")
    return rows[:, c * 1024 + h * 32 + w]


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _write_cifar10_pickles(root, rng, per_batch=3, n_test=4):
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rows, labels = [], []
    for b in range(1, 6):
        r, y = _cifar_rows(rng, per_batch), rng.integers(0, 10, per_batch).tolist()
        _dump(os.path.join(folder, f"data_batch_{b}"),
              {b"batch_label": b"x", b"labels": y, b"data": r, b"filenames": [b"f"] * per_batch})
        rows.append(r)
        labels += y
    test_rows, test_y = _cifar_rows(rng, n_test), rng.integers(0, 10, n_test).tolist()
    _dump(os.path.join(folder, "test_batch"), {b"labels": test_y, b"data": test_rows})
    names = [f"name{i}".encode() for i in range(10)]
    _dump(os.path.join(folder, "batches.meta"),
          {b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    return folder, np.concatenate(rows), np.array(labels), test_rows, np.array(test_y)


def test_cifar10_pickle_pixels_and_labels(tmp_path):
    rng = np.random.default_rng(3)
    folder, rows, labels, test_rows, test_y = _write_cifar10_pickles(str(tmp_path), rng)
    for where in (folder, str(tmp_path)):  # the batch folder or its parent
        ds = data.load_dataset("cifar10", source="pickle", data_dir=where)
        chex.assert_shape(ds.train_images, (15, 32, 32, 3))
        np.testing.assert_array_equal(ds.train_images, _expected_nhwc(rows))
        np.testing.assert_array_equal(ds.test_images, _expected_nhwc(test_rows))
        np.testing.assert_array_equal(ds.train_labels, labels)
        np.testing.assert_array_equal(ds.test_labels, test_y)
        assert ds.class_names == tuple(f"name{i}" for i in range(10))
        assert ds.mean == (0.4914, 0.4822, 0.4465) and ds.std == (0.2023, 0.1994, 0.2010)
    # One image, pixel by pixel, with plain loops.
    img, row = ds.train_images[7], rows[7]
    for c in range(3):
        for h in range(32):
            for w in range(32):
                assert img[h, w, c] == row[c * 1024 + h * 32 + w]


def test_cifar100_pickle_uses_fine_labels(tmp_path):
    rng = np.random.default_rng(4)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rows, test_rows = _cifar_rows(rng, 6), _cifar_rows(rng, 3)
    fine, coarse = rng.integers(0, 100, 6).tolist(), rng.integers(0, 20, 6).tolist()
    test_fine = rng.integers(0, 100, 3).tolist()
    _dump(folder / "train", {b"data": rows, b"fine_labels": fine, b"coarse_labels": coarse})
    _dump(folder / "test", {b"data": test_rows, b"fine_labels": test_fine,
                            b"coarse_labels": [0, 0, 0]})
    names = [f"fine{i}".encode() for i in range(100)]
    _dump(folder / "meta", {b"fine_label_names": names,
                            b"coarse_label_names": [b"c"] * 20})
    ds = data.load_dataset("cifar100", source="pickle", data_dir=str(tmp_path))
    np.testing.assert_array_equal(ds.train_images, _expected_nhwc(rows))
    np.testing.assert_array_equal(ds.test_images, _expected_nhwc(test_rows))
    np.testing.assert_array_equal(ds.train_labels, fine)
    np.testing.assert_array_equal(ds.test_labels, test_fine)
    assert ds.num_classes == 100 and ds.class_names[5] == "fine5"
    assert ds.mean == (0.5071, 0.4866, 0.4409) and ds.std == (0.2673, 0.2564, 0.2762)
    with pytest.raises(ValueError, match="holds cifar100, not cifar10"):
        data.load_dataset("cifar10", source="pickle", data_dir=str(tmp_path))


def test_pickle_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="not a CIFAR python-pickle folder"):
        data.load_dataset("cifar10", source="pickle", data_dir=str(tmp_path))
    rng = np.random.default_rng(5)
    folder, *_ = _write_cifar10_pickles(str(tmp_path), rng)
    os.remove(os.path.join(folder, "data_batch_4"))
    with pytest.raises(ValueError, match="data_batch_4"):
        data.load_dataset("cifar10", source="pickle", data_dir=folder)


# ----------------------------------------------------------------------------- digits


def test_digits_dataset():
    from sklearn.datasets import load_digits
    raw = load_digits()
    ds = data.load_dataset("digits")  # default source for digits
    chex.assert_shape(ds.train_images, (1438, 16, 16, 1))
    chex.assert_shape(ds.test_images, (359, 16, 16, 1))
    assert ds.num_classes == 10 and ds.image_shape == (16, 16, 1)
    # Stratified 80/20: per class round(0.8 * n_c) train images, the rest test.
    n_c = np.bincount(raw.target)
    np.testing.assert_array_equal(ds.class_counts, np.floor(0.8 * n_c + 0.5))
    np.testing.assert_array_equal(np.bincount(ds.test_labels, minlength=10),
                                  n_c - np.floor(0.8 * n_c + 0.5))
    # Pixel replication x2: each 2x2 block is constant.
    x = np.concatenate([ds.train_images, ds.test_images])[..., 0]
    for dy in (0, 1):
        for dx in (0, 1):
            np.testing.assert_array_equal(x[:, dy::2, dx::2], x[:, ::2, ::2])
    # Together the splits are exactly sklearn's images (v*255/16 rounded) with their labels.
    y = np.concatenate([ds.train_labels, ds.test_labels])
    got = sorted(bytes(img) + bytes([lab]) for img, lab in zip(x[:, ::2, ::2], y))
    expected_pixels = np.round(raw.images * 255.0 / 16.0).astype(np.uint8)
    want = sorted(bytes(img) + bytes([lab]) for img, lab in zip(expected_pixels, raw.target))
    assert got == want
    # Deterministic split.
    again = data.load_dataset("digits", source="digits")
    np.testing.assert_array_equal(again.train_images, ds.train_images)
    # Hard-coded constants equal a recomputation over the train split ([0,1], population std).
    t = ds.train_images.astype(np.float64) / 255.0
    assert abs(ds.mean[0] - t.mean()) < 5e-5 and abs(ds.std[0] - t.std()) < 5e-5
    assert ds.mean == core.DIGITS_MEAN and ds.std == core.DIGITS_STD


# ----------------------------------------------------------------------------- image folders


def _save(path, array, fmt="PNG"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mode = "L" if array.ndim == 2 else "RGB"
    Image.fromarray(array, mode).save(path, format=fmt)


def test_tinyimagenet_folder(tmp_path):
    rng = np.random.default_rng(6)
    root = str(tmp_path / "tiny-imagenet-200")
    wnids = ["n0300", "n0100", "n0200"]  # wnids.txt order; labels follow the sorted order
    os.makedirs(root)
    with open(os.path.join(root, "wnids.txt"), "w") as f:
        f.write("\n".join(wnids) + "\n")
    train = {}
    for w in wnids:
        for k in range(2):
            img = _rand_u8(rng, 64, 64, 3)
            _save(os.path.join(root, "train", w, "images", f"{w}_{k}.png"), img)
            train[(w, k)] = img
    # A greyscale file becomes 3 equal channels.
    grey = _rand_u8(rng, 64, 64)
    _save(os.path.join(root, "train", "n0100", "images", "n0100_2.png"), grey)
    train[("n0100", 2)] = np.repeat(grey[..., None], 3, axis=2)
    val_lines, val = [], []
    for k, w in enumerate(["n0200", "n0300", "n0100", "n0200"]):
        img = _rand_u8(rng, 64, 64, 3)
        _save(os.path.join(root, "val", "images", f"val_{k}.png"), img)
        val_lines.append(f"val_{k}.png\t{w}\t0\t0\t63\t63")
        val.append((w, img))
    with open(os.path.join(root, "val", "val_annotations.txt"), "w") as f:
        f.write("\n".join(val_lines) + "\n")

    ds = data.load_dataset("tinyimagenet", source="folder", data_dir=root, num_workers=2)
    assert ds.class_names == ("n0100", "n0200", "n0300")
    expected_keys = [("n0100", 0), ("n0100", 1), ("n0100", 2), ("n0200", 0), ("n0200", 1),
                     ("n0300", 0), ("n0300", 1)]
    np.testing.assert_array_equal(ds.train_images, np.stack([train[k] for k in expected_keys]))
    np.testing.assert_array_equal(ds.train_labels, [0, 0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(ds.test_images, np.stack([img for _, img in val]))
    np.testing.assert_array_equal(ds.test_labels, [1, 2, 0, 1])
    assert ds.mean == (0.485, 0.456, 0.406) and ds.std == (0.229, 0.224, 0.225)


def test_imagenet_subset_folder(tmp_path):
    rng = np.random.default_rng(7)
    root = str(tmp_path / "imagenet")
    size = 8
    wide = _rand_u8(rng, 8, 12, 3)  # shorter side already 8: only the centre crop applies
    _save(os.path.join(root, "train", "n02", "a.png"), wide)
    colour = np.zeros((20, 30, 3), np.uint8) + np.array([200, 30, 90], np.uint8)
    _save(os.path.join(root, "train", "n02", "b.png"), colour)
    tall = _rand_u8(rng, 12, 8, 3)
    _save(os.path.join(root, "train", "n00", "a.png"), tall)
    smooth = np.repeat(np.repeat(np.linspace(0, 255, 8)[None, :, None], 8, 0), 3, 2)
    _save(os.path.join(root, "train", "n01", "a.jpg"), smooth.astype(np.uint8), fmt="JPEG")
    for w in ("n00", "n01", "n02"):
        _save(os.path.join(root, "val", w, "v.png"), _rand_u8(rng, size, size, 3))
    with open(os.path.join(root, "train", "n01", "notes.txt"), "w") as f:
        f.write("not an image\n")

    ds = data.load_dataset("imagenet_subset", source="folder", data_dir=root, image_size=size)
    assert ds.class_names == ("n00", "n01", "n02")  # default: sorted train folders
    np.testing.assert_array_equal(ds.train_labels, [0, 1, 2, 2])
    chex.assert_shape(ds.train_images, (4, size, size, 3))
    np.testing.assert_array_equal(ds.train_images[0], tall[2:10])  # round((12-8)/2) = 2
    assert np.abs(ds.train_images[1].astype(int) - smooth).mean() < 4  # JPEG is lossy
    np.testing.assert_array_equal(ds.train_images[2], wide[:, 2:10])
    np.testing.assert_array_equal(ds.train_images[3], colour[:size, :size])  # constant colour

    # An explicit class list fixes the subset and the label order.
    class_list = tmp_path / "classes.txt"
    class_list.write_text("n02\n\nn00\n")
    sub = data.load_dataset("imagenet_subset", source="folder", data_dir=root, image_size=size,
                            class_list=str(class_list))
    assert sub.class_names == ("n02", "n00") and sub.num_classes == 2
    np.testing.assert_array_equal(sub.train_labels, [0, 0, 1])
    np.testing.assert_array_equal(sub.train_images[2], tall[2:10])
    class_list.write_text("n02\nn09\n")
    with pytest.raises(ValueError, match="n09"):
        data.load_dataset("imagenet_subset", source="folder", data_dir=root, image_size=size,
                          class_list=str(class_list))


# ----------------------------------------------------------------------------- array helpers


def test_class_arrays_matches_python_loop():
    rng = np.random.default_rng(8)
    k, n = 4, 23
    labels = rng.integers(0, k, n)
    labels[:k] = np.arange(k)  # every class present, unequal counts
    images = _rand_u8(rng, n, 3, 2, 1)
    per_class, counts = data.class_arrays(images, labels, k)
    n_max = max(sum(1 for y in labels if y == c) for c in range(k))
    chex.assert_shape(per_class, (k, n_max, 3, 2, 1))
    assert per_class.dtype == np.uint8 and counts.dtype == np.int32
    for c in range(k):
        members = [images[i] for i in range(n) if labels[i] == c]
        assert counts[c] == len(members)
        for j, img in enumerate(members):
            np.testing.assert_array_equal(per_class[c, j], img)
        assert not per_class[c, len(members):].any()  # zero padding
    with pytest.raises(ValueError, match=r"classes \[2\] have no images"):
        data.class_arrays(images[:3], np.array([0, 1, 3]), 4)
    with pytest.raises(ValueError, match="lie in"):
        data.class_arrays(images[:2], np.array([0, 4]), 4)


def test_normalize_denormalize():
    rng = np.random.default_rng(9)
    x = _rand_u8(rng, 2, 5, 5, 3)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    y = data.normalize(x, mean, std)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    reference = (x.astype(np.float64) / 255.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(y, reference, rtol=1e-5, atol=1e-5)
    # The same on JAX arrays, jitted; traced once for one shape.
    fn = jax.jit(chex.assert_max_traces(lambda a: data.normalize(a, mean, std), n=1))
    yj = fn(jnp.asarray(x))
    fn(jnp.asarray(x))
    assert yj.dtype == jnp.float32
    chex.assert_trees_all_close(np.asarray(yj), y, rtol=1e-6, atol=1e-6)
    back = data.denormalize(y, mean, std)
    np.testing.assert_allclose(back, x / 255.0, atol=1e-6)
    chex.assert_trees_all_close(np.asarray(data.denormalize(yj, mean, std)), back, atol=1e-6)
    clipped = data.denormalize(np.full((1, 3), 100.0, np.float32), mean, std, clip=True)
    np.testing.assert_array_equal(clipped, np.ones((1, 3)))


def _tiny_dataset(counts, **overrides):
    labels = np.repeat(np.arange(len(counts)), counts)
    fields = dict(name="toy", train_images=np.zeros((len(labels), 2, 2, 1), np.uint8),
                  train_labels=labels, test_images=np.zeros((1, 2, 2, 1), np.uint8),
                  test_labels=np.array([0]), num_classes=len(counts),
                  class_names=tuple(f"c{i}" for i in range(len(counts))), mean=(0.5,), std=(0.25,))
    fields.update(overrides)
    return data.Dataset(**fields)


def test_dataset_validation_and_properties():
    ds = _tiny_dataset([3, 1, 2])
    assert ds.train_labels.dtype == np.int32  # int64 input cast
    np.testing.assert_array_equal(ds.class_counts, [3, 1, 2])
    assert ds.image_shape == (2, 2, 1)
    bad = {
        "uint8": dict(train_images=np.zeros((6, 2, 2, 1), np.float32)),
        "4-D NHWC": dict(train_images=np.zeros((6, 2, 2), np.uint8)),
        "must lie in": dict(test_labels=np.array([3])),
        "expected \\(6,\\)": dict(train_labels=np.zeros(5, np.int64)),
        "class names": dict(class_names=("a", "b")),
        "one entry per channel": dict(mean=(0.5, 0.5, 0.5)),
        "must be integers": dict(test_labels=np.array([0.0])),
        "test images": dict(test_images=np.zeros((1, 3, 2, 1), np.uint8)),
    }
    for message, override in bad.items():
        with pytest.raises(ValueError, match=message):
            _tiny_dataset([3, 1, 2], **override)


def test_enough_per_class():
    ds = _tiny_dataset([5, 2, 4])
    assert data.min_class_count(ds) == 2
    data.check_enough_per_class(ds, 2, "ipc*4 = 2 for the mosaic init")
    with pytest.raises(ValueError, match=r"class 1 \('c1'\) has only 2 .* 4 are needed "
                                         r"\(ipc\*4 = 4 for the mosaic init\)"):
        data.check_enough_per_class(ds, 4, "ipc*4 = 4 for the mosaic init")


def test_dataset_info_constants():
    # Reference section 7 (the official code's constants, not the true CIFAR-10 std).
    info = data.DATASET_INFO
    assert (info["cifar10"].mean, info["cifar10"].std) == ((0.4914, 0.4822, 0.4465),
                                                           (0.2023, 0.1994, 0.2010))
    assert (info["cifar100"].mean, info["cifar100"].std) == ((0.5071, 0.4866, 0.4409),
                                                             (0.2673, 0.2564, 0.2762))
    for name in ("tinyimagenet", "imagenet_subset"):
        assert (info[name].mean, info[name].std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert (info["mnist"].mean, info["mnist"].std) == ((0.1307,), (0.3081,))
    assert (info["fashion_mnist"].mean, info["fashion_mnist"].std) == ((0.2861,), (0.3530,))
    assert (info["svhn"].mean, info["svhn"].std) == ((0.4377, 0.4438, 0.4728),
                                                     (0.1980, 0.2010, 0.1970))
    assert info["svhn"].tfds_name == "svhn_cropped"
    shapes = {n: (s.image_shape, s.num_classes) for n, s in info.items()}
    assert shapes["tinyimagenet"] == ((64, 64, 3), 200)
    assert shapes["imagenet_subset"] == ((224, 224, 3), 100)
    assert shapes["cifar100"] == ((32, 32, 3), 100) and len(info["cifar100"].class_names) == 100
    for spec in info.values():
        assert len(spec.mean) == len(spec.std) == spec.image_shape[2]


def test_unknown_names_and_sources():
    with pytest.raises(ValueError, match="Unknown dataset 'imagenet'.*cifar10.*tinyimagenet"):
        data.load_dataset("imagenet")
    with pytest.raises(ValueError, match="Unknown source 'hdf5'.*npy"):
        data.load_dataset("cifar10", source="hdf5")
    with pytest.raises(ValueError, match="cannot be loaded from source='pickle'"):
        data.load_dataset("mnist", source="pickle")
    with pytest.raises(ValueError, match="needs data_dir"):
        data.load_dataset("cifar10", source="npy")
    with pytest.raises(ValueError, match="source='folder' only"):
        data.load_dataset("digits", image_size=8)


def test_import_does_not_pull_in_tfds_or_tensorflow():
    code = ("import sys, idm_jax.data, idm_jax.data.convert; "
            "bad = [m for m in ('tensorflow_datasets', 'tensorflow') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO,
                   env={**os.environ, "JAX_PLATFORMS": "cpu"})


# ----------------------------------------------------------------------------- TFDS


def _prepare_tfds_cifar10(data_dir, name, n_train, n_test):
    """Prepares a real array_record TFDS dataset without TensorFlow (PIL encodes the PNGs).

    Image i of a split is filled with one value (value, label) chosen here, so the loaded
    records can be checked whatever order TFDS shuffled them into.
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    from tensorflow_datasets.image_classification import cifar

    def examples(n, offset):
        for i in range(n):
            value = offset + i
            yield i, {"id": f"{value}", "label": value % 10,
                      "image": Image.fromarray(np.full((32, 32, 3), value, np.uint8))}

    class Miniature(cifar.Cifar10, skip_registration=True):
        def _split_generators(self, dl_manager):
            return {"train": examples(n_train, 0), "test": examples(n_test, 100)}

    Miniature.name = name
    Miniature(data_dir=data_dir, file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))


def test_tfds_prepared_array_record(tmp_path):
    _prepare_tfds_cifar10(str(tmp_path), "cifar10", 25, 7)
    ds = data.load_dataset("cifar10", source="tfds", tfds_data_dir=str(tmp_path))
    chex.assert_shape(ds.train_images, (25, 32, 32, 3))
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
    for images, labels, values in ((ds.train_images, ds.train_labels, range(25)),
                                   (ds.test_images, ds.test_labels, range(100, 107))):
        v = images[:, 0, 0, 0].astype(int)
        assert (images == v[:, None, None, None]).all()
        assert sorted(v) == list(values)
        np.testing.assert_array_equal(labels, v % 10)
    assert ds.class_names[0] == "airplane"


def test_tfds_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = data.load_dataset("cifar10")
        source = tfds.data_source("cifar10", split="train")
        reference = np.stack([source[i]["image"] for i in range(12)])
        ref_labels = [int(source[i]["label"]) for i in range(12)]
    chex.assert_shape([ds.train_images, ds.test_images], (12, 32, 32, 3))
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
    np.testing.assert_array_equal(ds.train_images, reference)
    np.testing.assert_array_equal(ds.train_labels, ref_labels)


def test_tfds_not_prepared_says_how_to_prepare(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(ValueError, match="not prepared(.|\n)*idm_jax.data.convert"):
        data.load_dataset("mnist", source="tfds", tfds_data_dir=str(tmp_path))


# ----------------------------------------------------------------------------- converter


def _assert_same_dataset(a, b):
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert (a.name, a.num_classes, a.class_names) == (b.name, b.num_classes, b.class_names)
    np.testing.assert_allclose(a.mean, b.mean)
    np.testing.assert_allclose(a.std, b.std)


def test_convert_pickle_round_trip(tmp_path):
    rng = np.random.default_rng(10)
    folder, *_ = _write_cifar10_pickles(str(tmp_path / "src"), rng, per_batch=2, n_test=3)
    original = data.load_dataset("cifar10", source="pickle", data_dir=folder)
    out = str(tmp_path / "npy")
    assert convert.main(["--cifar_pickle", folder, "--out", out, "--chunk_rows", "4"]) == 0
    assert sorted(f for f in os.listdir(out) if f.startswith("train_x")) == [
        "train_x_0.npy", "train_x_1.npy", "train_x_2.npy"]  # 10 rows in chunks of 4
    _assert_same_dataset(data.load_dataset("cifar10", source="npy", data_dir=out), original)
    with pytest.raises(SystemExit):  # refuses to mix with existing files
        convert.main(["--cifar_pickle", folder, "--out", out])
    # The module entry point, as users run it.
    out2 = str(tmp_path / "npy2")
    subprocess.run([sys.executable, "-m", "idm_jax.data.convert", "--cifar_pickle", folder,
                    "--out", out2], check=True, cwd=REPO, capture_output=True,
                   env={**os.environ, "JAX_PLATFORMS": "cpu"})
    _assert_same_dataset(data.load_dataset("cifar10", source="npy", data_dir=out2), original)


def test_convert_tfds_known_and_other_dataset(tmp_path):
    tfds_dir = str(tmp_path / "tfds")
    _prepare_tfds_cifar10(tfds_dir, "cifar10", 20, 5)
    out = str(tmp_path / "cifar10_npy")
    convert.main(["--tfds", "cifar10", "--tfds_data_dir", tfds_dir, "--out", out])
    _assert_same_dataset(data.load_dataset("cifar10", source="npy", data_dir=out),
                         data.load_dataset("cifar10", tfds_data_dir=tfds_dir))
    # A TFDS dataset outside DATASET_INFO: mean/std computed from its train split.
    _prepare_tfds_cifar10(tfds_dir, "my_images", 20, 5)
    out = str(tmp_path / "other_npy")
    convert.main(["--tfds", "my_images", "--tfds_data_dir", tfds_dir, "--out", out])
    ds = data.load_dataset("my_images", source="npy", data_dir=out)
    x = ds.train_images.astype(np.float64) / 255.0
    np.testing.assert_allclose(ds.mean, x.mean(axis=(0, 1, 2)), rtol=1e-9)
    np.testing.assert_allclose(ds.std, x.std(axis=(0, 1, 2)), rtol=1e-9)
    assert sorted(ds.train_images[:, 0, 0, 0].tolist()) == list(range(20))


def test_a_class_names_file_with_too_few_names_is_named(tmp_path):
    rng = np.random.default_rng(3)
    d = _write_npy_dir(tmp_path / "d", {0: _rand_u8(rng, 6, 4, 4, 3)}, np.arange(6) % 5,
                       _rand_u8(rng, 2, 4, 4, 3), np.array([0, 4]), class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"class_names.txt gives 3 classes, but the labels .* "
                                         r"go up to 4"):
        data.load_dataset("cifar10", source="npy", data_dir=d)
