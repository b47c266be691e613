"""scikit-learn's bundled 8x8 handwritten digits as a small offline dataset.

`sklearn.datasets.load_digits` ships with scikit-learn (no download): 1797
greyscale 8x8 images with 17 grey levels 0..16, 10 classes (174..183 images
each). It is the dataset a fresh machine without network can always load, for
smoke runs of the whole pipeline.

Choices made here (fixed; `DIGITS_MEAN`/`DIGITS_STD` depend on them):
- Pixels: uint8 = round(v * 255 / 16), so 0 -> 0 and 16 -> 255.
- Size: upsampled to 16x16 by pixel replication (nearest neighbour, x2), so
  the image side divides by the partition factor 2 and a depth-3 ConvNet
  (three 2x2 pools) ends on 2x2 features. One channel.
- Split: stratified 80/20. For classes c = 0..9 in order, one
  `np.random.default_rng(0)` generator permutes the indices of class c and
  the first round(0.8 * n_c) go to train, the rest to test (1438 / 359 in
  total). Within each split the images keep sklearn's original order.
- Mean/std: over all pixels of the train split in [0,1] units (population
  std), rounded to 4 decimals.
"""

from __future__ import annotations

import numpy as np

from idm_jax.data import core

SPLIT_SEED = 0
TRAIN_FRACTION = 0.8
UPSAMPLE = 2


def split_indices(labels: np.ndarray, num_classes: int = 10
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split; returns sorted (train_idx, test_idx)."""
    rng = np.random.default_rng(SPLIT_SEED)
    train, test = [], []
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train = int(np.floor(TRAIN_FRACTION * len(idx) + 0.5))
        train.append(idx[:n_train])
        test.append(idx[n_train:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits_dataset() -> core.Dataset:
    """The `digits` Dataset: 16x16x1 uint8, 1438 train / 359 test, 10 classes."""
    from sklearn.datasets import load_digits
    raw = load_digits()
    levels = np.asarray(raw.images, np.float64)  # (1797, 8, 8), values 0..16
    labels = np.asarray(raw.target, np.int32)
    pixels = np.floor(levels * 255.0 / 16.0 + 0.5).astype(np.uint8)
    pixels = pixels.repeat(UPSAMPLE, axis=1).repeat(UPSAMPLE, axis=2)[..., None]
    train, test = split_indices(labels)
    spec = core.DATASET_INFO["digits"]
    return core.Dataset("digits", pixels[train], labels[train], pixels[test],
                        labels[test], spec.num_classes, spec.class_names,
                        spec.mean, spec.std)
