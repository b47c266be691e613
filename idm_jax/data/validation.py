"""A validation split carved from the training set, for choosing settings honestly.

Settings (a learning rate, a weight) must be chosen on data that is neither the test set, on
which the result is reported, nor the training images the condensation and its networks see.
``split_validation`` takes ``per_class`` training images of every class out of the dataset: the
returned dataset no longer holds them (so no real batch, queue batch, init or random-real
baseline can draw them), and the evaluation scores its models on them beside the test set.

The split depends only on the training labels, ``per_class`` and its own ``seed`` (not the run's
seed), so every run of a study, whatever its seed or method, holds out the same images.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import NamedTuple, Optional

import numpy as np

from idm_jax.data.core import Dataset


class ValidationSplit(NamedTuple):
    """Held-out training images: ``images`` (V, H, W, C) uint8, ``labels`` (V,) int32, and
    ``indices`` (V,) their rows in the full training set, ascending."""

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    per_class: int
    seed: int

    def record(self) -> dict:
        """What a run records of its split (the SHA-256 of the row indices identifies it)."""
        digest = hashlib.sha256(np.ascontiguousarray(self.indices, np.int64).tobytes())
        return {"per_class": self.per_class, "seed": self.seed, "images": int(self.labels.size),
                "indices_sha256": digest.hexdigest()}


def validation_indices(labels: np.ndarray, num_classes: int, per_class: int,
                       seed: int) -> np.ndarray:
    """Rows of ``per_class`` training images of every class, drawn without replacement with a
    generator of ``seed`` (class by class, in class order), ascending. (K * per_class,)."""
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == k))[:per_class]
              for k in range(num_classes)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def split_validation(dataset: Dataset, per_class: int,
                     seed: int = 0) -> tuple[Dataset, Optional[ValidationSplit]]:
    """(the dataset without the held-out images, the split); ``per_class`` 0: (dataset, None).

    Raises ValueError (naming ``--validation_per_class``) when a class would keep no training
    image.
    """
    if per_class < 0:
        raise ValueError(f"--validation_per_class must be >= 0, got {per_class}")
    if per_class == 0:
        return dataset, None
    counts = dataset.class_counts
    low = int(np.argmin(counts))
    if counts[low] <= per_class:
        raise ValueError(f"--validation_per_class {per_class}: class {low} "
                         f"({dataset.class_names[low]!r}) of {dataset.name} has only "
                         f"{int(counts[low])} training images and would keep none; hold out "
                         f"fewer")
    rows = validation_indices(dataset.train_labels, dataset.num_classes, per_class, seed)
    keep = np.ones(dataset.train_labels.size, bool)
    keep[rows] = False
    train = dataclasses.replace(dataset, train_images=dataset.train_images[keep],
                                train_labels=dataset.train_labels[keep])
    split = ValidationSplit(dataset.train_images[rows], dataset.train_labels[rows], rows,
                            per_class, seed)
    return train, split


__all__ = ["ValidationSplit", "validation_indices", "split_validation"]
