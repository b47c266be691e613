"""Datasets for idm-jax: loading, the in-memory record, normalisation.

Everything is held as raw uint8 NHWC NumPy arrays (`Dataset`); the engine
normalises on device with `normalize` and keeps the per-class layout of
`class_arrays`. `load_dataset` reads from TFDS, the project's NumPy-directory
format, the official CIFAR pickles, scikit-learn's digits or image folders.
Importing this package imports neither tensorflow_datasets nor TensorFlow.
"""

from idm_jax.data.cifar_pickle import load_cifar_pickle
from idm_jax.data.core import check_enough_per_class
from idm_jax.data.core import class_arrays
from idm_jax.data.core import DATASET_INFO
from idm_jax.data.core import Dataset
from idm_jax.data.core import DatasetSpec
from idm_jax.data.core import denormalize
from idm_jax.data.core import get_spec
from idm_jax.data.core import min_class_count
from idm_jax.data.core import normalize
from idm_jax.data.core import VALID_NAMES
from idm_jax.data.digits import load_digits_dataset
from idm_jax.data.folders import load_imagenet_subset
from idm_jax.data.folders import load_tinyimagenet
from idm_jax.data.loading import load_dataset
from idm_jax.data.loading import SOURCES
from idm_jax.data.npy_dir import load_npy_dir
from idm_jax.data.npy_dir import save_npy_dir
from idm_jax.data.validation import split_validation
from idm_jax.data.validation import ValidationSplit

__all__ = [
    "DATASET_INFO", "Dataset", "DatasetSpec", "SOURCES", "VALID_NAMES",
    "check_enough_per_class", "class_arrays", "denormalize", "get_spec",
    "load_cifar_pickle", "load_dataset", "load_digits_dataset",
    "load_imagenet_subset", "load_npy_dir", "load_tinyimagenet",
    "min_class_count", "normalize", "save_npy_dir", "split_validation", "ValidationSplit",
]
