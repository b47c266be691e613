"""Reading prepared TensorFlow Datasets (TFDS) into NumPy, without TensorFlow.

`tfds.data_source` gives random access to datasets prepared in the
array_record format and decodes images with PIL, so TensorFlow is not needed
to *read*. Preparing a dataset (download + conversion) does need TensorFlow,
and TFDS prepares in TFRecord format by default, which `data_source` cannot
read; for such a copy we fall back to `tfds.load` when TensorFlow is
importable.

`tensorflow_datasets` is imported inside the functions: the rest of the
package must import on machines without it.

Speed (CIFAR-10-sized array_record, 2 CPU cores): one `__getitems__` call per
block of 4096 records reads 50,000 images in ~5.5 s, against ~8 s for
`ds[i]` one at a time; PNG decoding dominates, and threads did not help.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Optional, Sequence

import numpy as np

READ_BLOCK = 4096


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ValueError(
            "source='tfds' needs the tensorflow_datasets package (pip install "
            "tensorflow-datasets), which is not installed here. Alternatively "
            "convert the dataset on a machine that has it (python -m "
            "idm_jax.data.convert --tfds NAME --out DIR) and load it with "
            "source='npy', data_dir=DIR.") from e
    return tfds


def prepare_hint(tfds_name: str, data_dir: Optional[str]) -> str:
    where = f", data_dir={data_dir!r}" if data_dir else ""
    return (
        f"To prepare it: pip install tensorflow, then python -c \"import "
        f"tensorflow_datasets as tfds; tfds.builder({tfds_name!r}{where}, "
        f"file_format='array_record').download_and_prepare()\" (array_record "
        f"can then be read without TensorFlow). Or, without TFDS: convert the "
        f"data once with python -m idm_jax.data.convert (--tfds on a machine where "
        f"it is prepared, or --cifar_pickle for the official CIFAR folders) and "
        f"load it with source='npy', data_dir=<the --out folder>.")


def _diagnose(tfds, tfds_name: str, split: str, data_dir: Optional[str],
              error: Exception) -> str:
    """One sentence on why `tfds.data_source` failed, for the error message."""
    try:
        prepared = tfds.builder(tfds_name, data_dir=data_dir).is_prepared()
    except Exception:  # pylint: disable=broad-except
        prepared = None
    where = data_dir or "the default TFDS data folder"
    if prepared is False:
        return f"TFDS dataset {tfds_name!r} is not prepared in {where}."
    return (f"TFDS dataset {tfds_name!r} (split {split!r}) in {where} cannot be read "
            f"without TensorFlow ({type(error).__name__}: {error}).")


def _read_records(source: Any, indices: Sequence[int]) -> list:
    """Decoded records for `indices`, in one batched call when possible."""
    getitems = getattr(source, "__getitems__", None)
    if getitems is not None:
        try:
            return list(getitems(list(indices)))
        except TypeError:
            # TFDS's test mock (tfds.testing.mock_data) installs an unbound
            # __getitems__ that fails with TypeError; single reads still work.
            pass
    return [source[i] for i in indices]


def read_split(source: Any, image_key: str = "image",
               label_key: str = "label") -> tuple[np.ndarray, np.ndarray]:
    """All records of a random-access source -> (images uint8, labels int64).

    Args:
      source: a `tfds.data_source` split (supports len and indexing).
      image_key, label_key: feature names of the image and the class label.

    Returns:
      images (N, H, W, C) uint8 and labels (N,) int64, in record order.
    """
    n = len(source)
    images = labels = None
    for start in range(0, n, READ_BLOCK):
        records = _read_records(source, range(start, min(start + READ_BLOCK, n)))
        for j, rec in enumerate(records):
            if image_key not in rec or label_key not in rec:
                raise ValueError(f"record has features {sorted(rec)}; expected "
                                 f"{image_key!r} and {label_key!r}")
            img = np.asarray(rec[image_key])
            if img.ndim == 2:
                img = img[..., None]
            if images is None:
                if img.dtype != np.uint8 or img.ndim != 3:
                    raise ValueError(f"feature {image_key!r} must be a uint8 HxWxC "
                                     f"image, got shape {img.shape} dtype {img.dtype}")
                images = np.empty((n,) + img.shape, np.uint8)
                labels = np.empty((n,), np.int64)
            elif img.shape != images.shape[1:]:
                raise ValueError(f"record {start + j}: image shape {img.shape} "
                                 f"differs from {images.shape[1:]}; only fixed-size "
                                 "images are supported")
            images[start + j] = img
            labels[start + j] = int(rec[label_key])
    if images is None:
        raise ValueError("the split is empty")
    return images, labels


def load_tfds_arrays(tfds_name: str, data_dir: Optional[str] = None,
                     splits: Sequence[str] = ("train", "test"),
                     image_key: str = "image", label_key: str = "label"
                     ) -> tuple[dict, list]:
    """Reads whole TFDS splits into NumPy.

    Args:
      tfds_name: TFDS builder name (e.g. "cifar10", "svhn_cropped").
      data_dir: TFDS data folder; None: the TFDS default (~/tensorflow_datasets
        or $TFDS_DATA_DIR).
      splits: split names to read.
      image_key, label_key: feature names.

    Returns:
      ({split: (images (N,H,W,C) uint8, labels (N,) int64)}, label names or []
      when the dataset does not provide them).
    """
    tfds = _import_tfds()
    out = {}
    names: list = []
    for split in splits:
        try:
            source = tfds.data_source(tfds_name, split=split, data_dir=data_dir,
                                      download=False)
        except Exception as first_error:  # pylint: disable=broad-except
            # TFDS raises assorted types here (missing dir, TFRecord format, ...).
            if importlib.util.find_spec("tensorflow") is None:
                raise ValueError(_diagnose(tfds, tfds_name, split, data_dir, first_error)
                                 + "\n" + prepare_hint(tfds_name, data_dir)) from first_error
            try:
                batch = tfds.as_numpy(tfds.load(tfds_name, split=split,
                                                data_dir=data_dir, batch_size=-1,
                                                download=False))
            except Exception as e:  # pylint: disable=broad-except
                raise ValueError(
                    f"TFDS dataset {tfds_name!r} (split {split!r}) is not prepared: "
                    f"{e}\n" + prepare_hint(tfds_name, data_dir)) from e
            images = np.asarray(batch[image_key])
            if images.ndim == 3:
                images = images[..., None]
            if images.dtype != np.uint8 or images.ndim != 4:
                raise ValueError(f"feature {image_key!r} must hold uint8 HxWxC "
                                 f"images, got shape {images.shape[1:]} dtype "
                                 f"{images.dtype}")
            out[split] = (images, np.asarray(batch[label_key], np.int64))
            continue
        out[split] = read_split(source, image_key, label_key)
        if not names:
            info = getattr(source, "dataset_info", None)
            try:
                names = list(info.features[label_key].names)
            except Exception:  # pylint: disable=broad-except
                names = []
    return out, names
