"""`load_dataset`: one entry point over all sources.

Sources and the datasets they serve:
  "tfds"    cifar10, cifar100, mnist, fashion_mnist, svhn (TFDS svhn_cropped)
  "npy"     any dataset, from a NumPy directory (idm_jax.data.npy_dir)
  "pickle"  cifar10, cifar100 from the official python-pickle folders
  "digits"  digits (scikit-learn's bundled 8x8 digits; offline)
  "folder"  tinyimagenet, imagenet_subset from image-file folders
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from idm_jax.data import cifar_pickle
from idm_jax.data import core
from idm_jax.data import digits
from idm_jax.data import folders
from idm_jax.data import npy_dir
from idm_jax.data import tfds_source

SOURCES = ("tfds", "npy", "pickle", "digits", "folder")


def _need_dir(data_dir: Optional[str], name: str, source: str) -> str:
    if data_dir is None:
        raise ValueError(f"source={source!r} for {name!r} needs data_dir (the "
                         "folder to read)")
    return str(data_dir)


def load_dataset(name: str, source: Optional[str] = None,
                 data_dir: Optional[str] = None,
                 tfds_data_dir: Optional[str] = None, *,
                 image_size: Optional[int] = None,
                 class_list: Optional[str] = None,
                 num_workers: Optional[int] = None) -> core.Dataset:
    """Loads a whole dataset into memory as uint8 NHWC arrays.

    Args:
      name: one of `DATASET_INFO` ("cifar10", "cifar100", "mnist",
        "fashion_mnist", "svhn", "digits", "tinyimagenet", "imagenet_subset").
        With source="npy" also any name whose folder's meta.json gives mean
        and std (datasets converted from other TFDS builders).
      source: "tfds", "npy", "pickle", "digits" or "folder"; None picks the
        dataset's natural source (tfds for the TFDS datasets, digits for
        digits, folder for the two ImageNet variants).
      data_dir: folder for "npy", "pickle" and "folder"; for "tfds" it is used
        as the TFDS data folder when tfds_data_dir is None.
      tfds_data_dir: TFDS data folder (None: the TFDS default).
      image_size: "folder" only: output side (default 64 for tinyimagenet, 224
        for imagenet_subset).
      class_list: imagenet_subset only: text file of wnids in label order.
      num_workers: "folder" only: image decoding threads.

    Returns:
      A validated `Dataset`.

    Raises:
      ValueError: unknown name or source, a source that cannot give this
        dataset, or missing/malformed files (the message says what to do).
    """
    if source is not None and source not in SOURCES:
        raise ValueError(f"Unknown source {source!r}. Valid sources: "
                         f"{', '.join(SOURCES)}.")
    if source == "npy":
        return npy_dir.load_npy_dir(_need_dir(data_dir, name, source), name)
    spec = core.get_spec(name)
    source = source or spec.default_source
    if source not in spec.sources:
        raise ValueError(f"{name!r} cannot be loaded from source={source!r}; use "
                         f"one of: {', '.join(spec.sources + ('npy',))}")
    if source != "folder" and (image_size is not None or class_list is not None
                               or num_workers is not None):
        raise ValueError("image_size, class_list and num_workers apply to "
                         "source='folder' only")

    if source == "digits":
        return digits.load_digits_dataset()
    if source == "pickle":
        return cifar_pickle.load_cifar_pickle(_need_dir(data_dir, name, source),
                                              name)
    if source == "folder":
        return _load_folder(name, spec, _need_dir(data_dir, name, source), image_size,
                            class_list, num_workers)
    return _load_tfds(name, spec, tfds_data_dir if tfds_data_dir is not None else data_dir)


def _load_folder(name: str, spec, root: str, image_size: Optional[int],
                 class_list: Optional[str], num_workers: Optional[int]) -> core.Dataset:
    """TinyImageNet or the ImageNet subset from image-file folders, at ``image_size``."""
    size = image_size or spec.image_shape[0]
    if name == "tinyimagenet":
        if class_list is not None:
            raise ValueError("class_list applies to imagenet_subset only")
        return folders.load_tinyimagenet(root, size, num_workers)
    return folders.load_imagenet_subset(root, size, class_list, num_workers)


def _load_tfds(name: str, spec, tfds_data_dir: Optional[str]) -> core.Dataset:
    """A prepared TFDS dataset (read without TensorFlow), its shape checked against the spec."""
    arrays, _ = tfds_source.load_tfds_arrays(spec.tfds_name, tfds_data_dir)
    (train_x, train_y), (test_x, test_y) = arrays["train"], arrays["test"]
    if train_x.shape[1:] != spec.image_shape:
        raise ValueError(f"TFDS {spec.tfds_name!r} images are {train_x.shape[1:]}"
                         f", expected {spec.image_shape}")
    return core.Dataset(name, train_x, train_y.astype(np.int32), test_x,
                        test_y.astype(np.int32), spec.num_classes,
                        spec.class_names, spec.mean, spec.std)
