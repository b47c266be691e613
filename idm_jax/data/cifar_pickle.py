"""Reader for the official CIFAR-10/100 "python version" pickle folders.

CIFAR-10 (`cifar-10-batches-py/`): data_batch_1..5, test_batch, batches.meta.
CIFAR-100 (`cifar-100-python/`): train, test, meta; we use the fine labels.
Each batch is a pickled dict with byte-string keys; b"data" is an (n, 3072)
uint8 array whose rows are the image in CHW order (1024 red, then 1024 green,
then 1024 blue values, each plane row-major), which we turn into NHWC.

Pickle runs code from the file while loading: only read files you trust
(the official archives).
"""

from __future__ import annotations

import os
import pickle

import numpy as np

from idm_jax.data import core

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR100_FOLDER = "cifar-100-python"


def _unpickle(path: str) -> dict:
    if not os.path.exists(path):
        raise ValueError(f"missing CIFAR pickle file {path}")
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    # Official files use bytes keys; accept str keys too (re-pickled copies).
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def rows_to_nhwc(rows: np.ndarray, path: str = "") -> np.ndarray:
    """(n, 3072) CHW-flattened rows -> (n, 32, 32, 3) uint8 NHWC."""
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' must be (n, 3072) (CHW rows of 32x32x3 "
                         f"images), got shape {rows.shape}")
    return np.ascontiguousarray(
        rows.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _read_batches(paths: list[str], label_key: str
                  ) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for p in paths:
        d = _unpickle(p)
        if "data" not in d or label_key not in d:
            raise ValueError(f"{p}: expected keys b'data' and b'{label_key}', found "
                             f"{sorted(d)}")
        x = rows_to_nhwc(d["data"], p)
        y = np.asarray(d[label_key], np.int64)
        if y.shape != (len(x),):
            raise ValueError(f"{p}: {len(y)} labels for {len(x)} images")
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys).astype(np.int32)


def _names(meta: dict, key: str) -> tuple[str, ...]:
    return tuple(n.decode() if isinstance(n, bytes) else str(n)
                 for n in meta[key])


def detect(directory: str) -> tuple[str, str]:
    """Returns (dataset name, batch folder) for a CIFAR pickle folder.

    `directory` is the batch folder itself or its parent (where the official
    tar.gz was extracted).
    """
    for folder in (directory, os.path.join(directory, CIFAR10_FOLDER),
                   os.path.join(directory, CIFAR100_FOLDER)):
        if os.path.exists(os.path.join(folder, "batches.meta")):
            return "cifar10", folder
        if os.path.exists(os.path.join(folder, "meta")) and os.path.exists(
            os.path.join(folder, "train")):
            return "cifar100", folder
    raise ValueError(
        f"{directory!r} is not a CIFAR python-pickle folder: expected "
        f"{CIFAR10_FOLDER}/ (data_batch_1..5, test_batch, batches.meta) or "
        f"{CIFAR100_FOLDER}/ (train, test, meta), or their parent folder")


def load_cifar_pickle(directory: str, name: str | None = None
                      ) -> core.Dataset:
    """Loads CIFAR-10 or CIFAR-100 from the official pickle folder.

    Args:
      directory: batch folder or its parent.
      name: "cifar10" or "cifar100" to check what is found; None accepts either.
    """
    found, folder = detect(directory)
    if name is not None and name != found:
        raise ValueError(f"{folder} holds {found}, not {name}")
    spec = core.DATASET_INFO[found]
    if found == "cifar10":
        train = [os.path.join(folder, f"data_batch_{i}") for i in range(1, 6)]
        test = [os.path.join(folder, "test_batch")]
        label_key, meta_file, names_key = "labels", "batches.meta", "label_names"
    else:
        train = [os.path.join(folder, "train")]
        test = [os.path.join(folder, "test")]
        label_key, meta_file, names_key = "fine_labels", "meta", "fine_label_names"
    train_x, train_y = _read_batches(train, label_key)
    test_x, test_y = _read_batches(test, label_key)
    meta = _unpickle(os.path.join(folder, meta_file))
    class_names = (_names(meta, names_key) if names_key in meta
                   else spec.class_names)
    return core.Dataset(found, train_x, train_y, test_x, test_y,
                        spec.num_classes, class_names, spec.mean, spec.std)
