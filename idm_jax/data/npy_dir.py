"""The project's own on-disk format: a directory of plain .npy files.

Layout (that of /work/shared/data/cifar10):

  train_x_0.npy, train_x_1.npy, ...  (n_k, H, W, C) uint8 chunks, joined in
                                     numeric chunk order 0, 1, 2, ..., 10, ...
                                     (or one file train_x.npy)
  train_y.npy                        (N,) integer labels (int64 on disk is fine)
  test_x.npy                         (M, H, W, C) uint8 (or test_x_0.npy, ...)
  test_y.npy                         (M,) integer labels
  class_names.txt                    optional, one name per line, label order
  meta.json                          optional: {"name", "mean", "std",
                                     "num_classes", ...}

Chunks keep every file small (the shared copy keeps each under 31 MB).
`meta.json` makes a directory self-describing, so datasets outside
`DATASET_INFO` (converted from any TFDS dataset) can be loaded by name.
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

import numpy as np

from idm_jax.data import core

META_FILE = "meta.json"
CLASS_NAMES_FILE = "class_names.txt"
DEFAULT_CHUNK_ROWS = 10000


def _chunk_files(directory: str, prefix: str) -> list[str]:
    """Paths of `prefix`.npy or `prefix`_0.npy, _1.npy, ... in numeric order."""
    pattern = re.compile(rf"^{prefix}_(\d+)\.npy$")
    numbered = {}
    for fname in os.listdir(directory):
        m = pattern.match(fname)
        if m:
            numbered[int(m.group(1))] = fname
    single = os.path.join(directory, f"{prefix}.npy")
    if numbered and os.path.exists(single):
        raise ValueError(f"{directory} holds both {prefix}.npy and {prefix}_<k>.npy"
                         " chunks; keep only one of the two forms")
    if not numbered:
        if os.path.exists(single):
            return [single]
        raise ValueError(f"{directory}: missing {prefix}.npy (or chunks "
                         f"{prefix}_0.npy, {prefix}_1.npy, ...)")
    keys = sorted(numbered)
    if keys != list(range(len(keys))):
        missing = sorted(set(range(keys[-1] + 1)) - set(keys))
        raise ValueError(f"{directory}: {prefix} chunks must be numbered 0..n-1 "
                         f"without gaps; missing {prefix}_{missing[0]}.npy")
    return [os.path.join(directory, numbered[k]) for k in keys]


def _read(path: str, mmap_mode: Optional[str] = None) -> np.ndarray:
    """``np.load`` of one array file, with errors that name the file."""
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        # NumPy calls any file without its header "pickled data".
        reason = ("no .npy header" if "pickle" in str(e) else f"{type(e).__name__}: {e}")
        raise ValueError(f"{path} is not a readable .npy array ({reason}); it may be truncated "
                         f"or of another format") from None


def _load_images(directory: str, prefix: str) -> np.ndarray:
    """Joins the image chunks into one in-memory (N, H, W, C) uint8 array."""
    paths = _chunk_files(directory, prefix)
    parts = []
    for p in paths:
        a = _read(p, mmap_mode="r")
        if a.dtype != np.uint8 or a.ndim != 4:
            raise ValueError(f"{p}: expected a (n, H, W, C) uint8 array (NHWC, raw "
                             f"0..255 pixels), got shape {a.shape} dtype {a.dtype}")
        if parts and a.shape[1:] != parts[0].shape[1:]:
            raise ValueError(f"{p}: image shape {a.shape[1:]} differs from "
                             f"{parts[0].shape[1:]} in {paths[0]}")
        parts.append(a)
    # Concatenation reads the memory-mapped chunks once into a fresh array.
    return np.concatenate(parts, axis=0)


def _load_labels(path: str, n: int) -> np.ndarray:
    if not os.path.exists(path):
        raise ValueError(f"missing label file {path} (expected ({n},) integers)")
    y = _read(path)
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (n,):
        raise ValueError(f"{path}: expected ({n},) integer labels to match the "
                         f"images, got shape {y.shape} dtype {y.dtype}")
    return y.astype(np.int32)


def read_meta(directory: str) -> dict:
    """The parsed meta.json of `directory`, or {} when there is none."""
    path = os.path.join(directory, META_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return meta


def _dataset_name(directory: str, meta: dict, name: Optional[str]) -> str:
    """The dataset's name: ``name``, checked against meta.json's, or meta.json's."""
    meta_name = meta.get("name")
    if name is None:
        if meta_name is None:
            raise ValueError(f"{directory}: give the dataset name, or write it in "
                             f"{META_FILE} as \"name\"")
        return meta_name
    if meta_name is not None and meta_name != name:
        raise ValueError(f"{directory} holds dataset {meta_name!r} (see "
                         f"{META_FILE}), not {name!r}")
    return name


def _classes(directory: str, meta: dict, spec, name: str, train_y: np.ndarray,
             test_y: np.ndarray) -> tuple[int, tuple]:
    """(number of classes, class names): meta.json, class_names.txt, the known dataset, or
    the labels, in that order; the labels must fit."""
    names_path = os.path.join(directory, CLASS_NAMES_FILE)
    class_names = None
    if os.path.exists(names_path):
        with open(names_path) as f:
            class_names = tuple(line.strip() for line in f if line.strip())
    top = int(max(train_y.max(initial=-1), test_y.max(initial=-1)))
    if "num_classes" in meta:
        k, source = int(meta["num_classes"]), os.path.join(directory, META_FILE)
    elif class_names is not None:
        k, source = len(class_names), names_path
    elif spec is not None:
        k, source = spec.num_classes, f"dataset {name}"
    else:
        k, source = top + 1, ""
    if top >= k:
        raise ValueError(f"{source} gives {k} classes, but the labels in {directory} go up to "
                         f"{top}; list every class (or fix the labels)")
    if class_names is None:
        if spec is not None and spec.class_names is not None:
            class_names = spec.class_names
        else:
            class_names = tuple(str(i) for i in range(k))
    if len(class_names) != k:
        raise ValueError(f"{names_path}: {len(class_names)} names for {k} classes")
    return k, class_names


def load_npy_dir(directory: str, name: Optional[str] = None) -> core.Dataset:
    """Loads a NumPy directory (layout in the module docstring).

    Args:
      directory: the folder.
      name: expected dataset name. When given and meta.json names another
        dataset, that is an error (it catches loading the wrong folder). When
        None, meta.json must name the dataset.

    Returns:
      A Dataset. Mean/std come from meta.json when present, else from
      `DATASET_INFO[name]`; class names from class_names.txt, else
      `DATASET_INFO`, else "0", "1", ...
    """
    if not os.path.isdir(directory):
        raise ValueError(f"NumPy dataset directory {directory!r} does not exist")
    meta = read_meta(directory)
    name = _dataset_name(directory, meta, name)
    spec = core.DATASET_INFO.get(name)
    if spec is None and not ("mean" in meta and "std" in meta):
        raise ValueError(
            f"Unknown dataset {name!r}: valid names are "
            f"{', '.join(core.VALID_NAMES)}; a NumPy directory of another dataset "
            f"needs \"mean\" and \"std\" in its {META_FILE}")
    train_x = _load_images(directory, "train_x")
    test_x = _load_images(directory, "test_x")
    train_y = _load_labels(os.path.join(directory, "train_y.npy"), len(train_x))
    test_y = _load_labels(os.path.join(directory, "test_y.npy"), len(test_x))
    k, class_names = _classes(directory, meta, spec, name, train_y, test_y)
    mean = meta.get("mean", spec.mean if spec else None)
    std = meta.get("std", spec.std if spec else None)
    return core.Dataset(name, train_x, train_y, test_x, test_y, k, class_names,
                        mean, std)


def check_output_dir(directory: str) -> None:
    """Raises ValueError if `directory` already holds files of this format."""
    if not os.path.isdir(directory):
        if os.path.exists(directory):
            raise ValueError(f"{directory} exists and is not a directory")
        return
    ours = re.compile(r"^(train|test)_[xy](_\d+)?\.npy$")
    clash = sorted(f for f in os.listdir(directory)
                   if ours.match(f) or f in (META_FILE, CLASS_NAMES_FILE))
    if clash:
        raise ValueError(f"{directory} already holds dataset files ({clash[0]}, "
                         "...); choose an empty or new output directory")


def save_npy_dir(dataset: core.Dataset, directory: str,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS,
                 extra_meta: Optional[dict] = None) -> None:
    """Writes `dataset` in the NumPy-directory layout.

    Splits larger than `chunk_rows` images are written as numbered chunks.
    Labels are written as int64 (as in the shared CIFAR-10 copy). The folder
    may exist but must not already hold dataset files: stale chunks would be
    joined with new ones on load.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    check_output_dir(directory)
    os.makedirs(directory, exist_ok=True)
    for split in ("train", "test"):
        x = getattr(dataset, f"{split}_images")
        y = getattr(dataset, f"{split}_labels")
        if len(x) <= chunk_rows:
            np.save(os.path.join(directory, f"{split}_x.npy"), x)
        else:
            for k, start in enumerate(range(0, len(x), chunk_rows)):
                np.save(os.path.join(directory, f"{split}_x_{k}.npy"),
                        x[start:start + chunk_rows])
        np.save(os.path.join(directory, f"{split}_y.npy"), y.astype(np.int64))
    with open(os.path.join(directory, CLASS_NAMES_FILE), "w") as f:
        f.write("".join(n + "\n" for n in dataset.class_names))
    meta = {
        "name": dataset.name,
        "num_classes": dataset.num_classes,
        "image_shape": list(dataset.image_shape),
        "mean": list(dataset.mean),
        "std": list(dataset.std),
        "num_train": int(len(dataset.train_images)),
        "num_test": int(len(dataset.test_images)),
    }
    meta.update(extra_meta or {})
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
