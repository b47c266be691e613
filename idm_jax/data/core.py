"""The in-memory dataset record, per-dataset constants, and array helpers.

A `Dataset` is the whole labelled train and test split of an image
classification dataset held as raw uint8 NHWC NumPy arrays, together with the
channel mean/std that the official IDM code uses for its `Normalize`
transform. Normalisation is applied later (on device), so the record stays
lossless and 4x smaller than float32.

`DATASET_INFO` holds the fixed facts per supported dataset (image shape,
number of classes, mean/std in [0,1] pixel units as in the official code
(docs/FAITHFULNESS.md, "data"), class names, where it can be loaded from).

`class_arrays` turns a labelled set into the per-class layout the engine keeps
on device: (K, Nmax, H, W, C) with zero padding for classes smaller than the
largest one; `counts` says how many rows of each class are real.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)

# The fine label names of CIFAR-100 in label order (alphabetical, as in the
# official `meta` file).
CIFAR100_CLASSES = tuple("""
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy
bridge bus butterfly camel can castle caterpillar cattle chair chimpanzee
clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant
flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower
leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom
oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate
poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew
skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper
table tank telephone television tiger tractor train trout tulip turtle wardrobe
whale willow_tree wolf woman worm
""".split())
assert len(CIFAR100_CLASSES) == 100

FASHION_MNIST_CLASSES = (
    "t-shirt_top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)
DIGIT_CLASSES = tuple(str(i) for i in range(10))

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Mean/std of the `digits` train split (see idm_jax.data.digits), in [0,1]
# pixel units, population std over all train pixels. Recomputed by a test.
DIGITS_MEAN = (0.3056,)
DIGITS_STD = (0.3764,)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Fixed facts about one supported dataset.

    Attributes:
      name: our name of the dataset (the key in `DATASET_INFO`).
      image_shape: (H, W, C) of the images as loaded (the default size for
        `imagenet_subset`, which can be loaded at another size).
      num_classes: number of classes K.
      mean, std: per-channel constants of the official code's `Normalize`, in
        [0,1] pixel units.
      class_names: names in label order, or None when they come from the files.
      sources: the `load_dataset` sources that can produce it (besides "npy",
        which can hold any dataset).
      tfds_name: the TFDS builder name, when it is a TFDS dataset.
    """
    name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: Optional[tuple[str, ...]]
    sources: tuple[str, ...]
    tfds_name: Optional[str] = None

    @property
    def default_source(self) -> str:
        return self.sources[0]


DATASET_INFO: dict[str, DatasetSpec] = {
    # The official code's CIFAR-10 std (0.2023, ...) is not the true std of
    # the data (0.2470, 0.2435, 0.2616); we keep the official constants.
    "cifar10": DatasetSpec(
        "cifar10", (32, 32, 3), 10, (0.4914, 0.4822, 0.4465),
        (0.2023, 0.1994, 0.2010), CIFAR10_CLASSES,
        ("tfds", "pickle"), "cifar10"),
    "cifar100": DatasetSpec(
        "cifar100", (32, 32, 3), 100, (0.5071, 0.4866, 0.4409),
        (0.2673, 0.2564, 0.2762), CIFAR100_CLASSES,
        ("tfds", "pickle"), "cifar100"),
    "mnist": DatasetSpec(
        "mnist", (28, 28, 1), 10, (0.1307,), (0.3081,), DIGIT_CLASSES,
        ("tfds",), "mnist"),
    "fashion_mnist": DatasetSpec(
        "fashion_mnist", (28, 28, 1), 10, (0.2861,), (0.3530,),
        FASHION_MNIST_CLASSES, ("tfds",), "fashion_mnist"),
    "svhn": DatasetSpec(
        "svhn", (32, 32, 3), 10, (0.4377, 0.4438, 0.4728),
        (0.1980, 0.2010, 0.1970), DIGIT_CLASSES, ("tfds",), "svhn_cropped"),
    "digits": DatasetSpec(
        "digits", (16, 16, 1), 10, DIGITS_MEAN, DIGITS_STD, DIGIT_CLASSES,
        ("digits",)),
    "tinyimagenet": DatasetSpec(
        "tinyimagenet", (64, 64, 3), 200, IMAGENET_MEAN, IMAGENET_STD, None,
        ("folder",)),
    # The official ImageNet script feeds *unnormalised* [0,1] train images to
    # condensation and normalises only the test set (docs/FAITHFULNESS.md,
    # "quirks and options"); that choice belongs to the engine, the constants
    # here are ImageNet's.
    "imagenet_subset": DatasetSpec(
        "imagenet_subset", (224, 224, 3), 100, IMAGENET_MEAN, IMAGENET_STD,
        None, ("folder",)),
}

VALID_NAMES = tuple(DATASET_INFO)


def get_spec(name: str) -> DatasetSpec:
    """Returns `DATASET_INFO[name]`, or a ValueError listing the valid names."""
    if name not in DATASET_INFO:
        raise ValueError(
            f"Unknown dataset {name!r}. Valid names: {', '.join(VALID_NAMES)}.")
    return DATASET_INFO[name]


def _as_float_tuple(values: Any, what: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in np.asarray(values, np.float64).reshape(-1))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be a sequence of numbers, got {values!r}"
                         ) from e
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A whole image classification dataset in memory, raw uint8 NHWC.

    Attributes:
      name: dataset name (a `DATASET_INFO` key, or the name in a NumPy
        directory's meta.json).
      train_images: (N, H, W, C) uint8, raw pixel values 0..255.
      train_labels: (N,) int32 in [0, num_classes).
      test_images: (M, H, W, C) uint8.
      test_labels: (M,) int32 in [0, num_classes).
      num_classes: K.
      class_names: K names in label order.
      mean, std: C floats each, [0,1] pixel units (x/255 - mean) / std.

    Integer labels of another integer dtype are cast to int32; everything else
    that does not fit raises ValueError.
    """
    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # frozen dataclass
        k = int(self.num_classes)
        if k < 1:
            raise ValueError(f"{self.name}: num_classes must be >= 1, got {k}")
        set_("num_classes", k)
        names = tuple(str(n) for n in self.class_names)
        if len(names) != k:
            raise ValueError(f"{self.name}: {len(names)} class names given for "
                             f"{k} classes")
        set_("class_names", names)
        shapes = []
        for split in ("train", "test"):
            x = getattr(self, f"{split}_images")
            y = getattr(self, f"{split}_labels")
            if not isinstance(x, np.ndarray):
                raise ValueError(f"{self.name}: {split}_images must be a NumPy array, "
                                 f"got {type(x).__name__}")
            if x.dtype != np.uint8:
                raise ValueError(f"{self.name}: {split}_images must be uint8 (raw "
                                 f"0..255 pixels), got {x.dtype}")
            if x.ndim != 4:
                raise ValueError(f"{self.name}: {split}_images must be 4-D NHWC, got "
                                 f"shape {x.shape}")
            y = np.asarray(y)
            if not np.issubdtype(y.dtype, np.integer):
                raise ValueError(f"{self.name}: {split}_labels must be integers, got "
                                 f"{y.dtype}")
            if y.shape != (x.shape[0],):
                raise ValueError(f"{self.name}: {split}_labels has shape {y.shape}, "
                                 f"expected ({x.shape[0]},) to match {split}_images")
            if y.size and (y.min() < 0 or y.max() >= k):
                raise ValueError(f"{self.name}: {split}_labels must lie in [0, {k}), "
                                 f"found range [{y.min()}, {y.max()}]")
            set_(f"{split}_labels", y.astype(np.int32, copy=False))
            shapes.append(x.shape[1:])
        if shapes[0] != shapes[1]:
            raise ValueError(f"{self.name}: train images are {shapes[0]} but test "
                             f"images are {shapes[1]} (H, W, C)")
        c = shapes[0][2]
        mean = _as_float_tuple(self.mean, "mean")
        std = _as_float_tuple(self.std, "std")
        if len(mean) != c or len(std) != c:
            raise ValueError(f"{self.name}: mean {mean} and std {std} must have one "
                             f"entry per channel ({c})")
        if min(std) <= 0:
            raise ValueError(f"{self.name}: std must be positive, got {std}")
        set_("mean", mean)
        set_("std", std)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C)."""
        return tuple(int(d) for d in self.train_images.shape[1:])

    @property
    def class_counts(self) -> np.ndarray:
        """(K,) int64: number of train images per class."""
        return np.bincount(self.train_labels, minlength=self.num_classes)

    def __repr__(self) -> str:
        return (f"Dataset(name={self.name!r}, train={self.train_images.shape}, "
                f"test={self.test_images.shape}, num_classes={self.num_classes})")


def normalize(images, mean: Sequence[float], std: Sequence[float]):
    """Maps raw pixels to the network input: (x / 255 - mean) / std.

    Args:
      images: (..., C) uint8 (or any real dtype holding 0..255 values), NumPy or
        JAX array; works under `jax.jit`.
      mean, std: C floats in [0,1] pixel units.

    Returns:
      float32 array of the same shape and array kind as `images`.
    """
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    return (images.astype(np.float32) / np.float32(255.0) - mean) / std


def denormalize(x, mean: Sequence[float], std: Sequence[float],
                clip: bool = False):
    """Inverse of `normalize`: x * std + mean, in [0,1] pixel units.

    Args:
      x: (..., C) normalised float array (NumPy or JAX).
      mean, std: C floats in [0,1] pixel units.
      clip: clip the result to [0, 1] (for display of synthetic images, which
        may leave the valid range).

    Returns:
      float32 array, same shape.
    """
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    out = x.astype(np.float32) * std + mean
    return out.clip(0.0, 1.0) if clip else out


def class_arrays(images: np.ndarray, labels: np.ndarray, num_classes: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Groups a labelled set by class, padding every class to the largest one.

    Args:
      images: (N, H, W, C) array (any dtype; uint8 in practice).
      labels: (N,) integers in [0, num_classes).
      num_classes: K.

    Returns:
      per_class: (K, Nmax, H, W, C), same dtype as `images`; row j of class c is
        the j-th image of class c in the original order; rows j >= counts[c] are
        zeros and must never be sampled.
      counts: (K,) int32, images per class.

    Raises:
      ValueError: labels out of range or a class without any image.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels shape {labels.shape} does not match "
                         f"{images.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), found "
                         f"[{labels.min()}, {labels.max()}]")
    counts = np.bincount(labels, minlength=num_classes).astype(np.int32)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise ValueError(f"classes {empty.tolist()} have no images; every class "
                         "needs at least one")
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(labels.size) - starts[sorted_labels]
    out = np.zeros((num_classes, int(counts.max())) + images.shape[1:],
                   images.dtype)
    out[sorted_labels, rank] = images[order]
    return out, counts


def min_class_count(dataset: Dataset) -> int:
    """Smallest number of train images in any class."""
    return int(dataset.class_counts.min())


def check_enough_per_class(dataset: Dataset, needed: int, what: str = ""
                           ) -> None:
    """Raises ValueError when some class has fewer than `needed` train images.

    Args:
      dataset: the dataset.
      needed: images required per class.
      what: what they are needed for, e.g. "ipc*4 = 40 for the mosaic init".
    """
    counts = dataset.class_counts
    c = int(np.argmin(counts))
    if counts[c] < needed:
        purpose = f" ({what})" if what else ""
        raise ValueError(
            f"{dataset.name}: class {c} ({dataset.class_names[c]!r}) has only "
            f"{counts[c]} train images, but {needed} are needed{purpose}. Use a "
            "smaller ipc or a dataset with more images per class.")
