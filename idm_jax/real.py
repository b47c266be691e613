"""The real training set on the device: its per-class layout, and the batches drawn from it.

IDM reads real images in two ways each iteration: a batch of every class for matching (drawn
without replacement within the class) and batches of the whole train set for training the queue
models. Both draw from one array of raw uint8 pixels laid out class by class, which stays on the
device (4x less memory than float; ImageNet-100 fits this way) and is normalised batch by batch.

On a device mesh the class axis of that array is split over the devices (``shard_real``); when
the device count does not divide the number of classes, empty padding classes are appended.
``RealData.counts`` always has exactly K entries and defines K.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from idm_jax import data as data_lib
from idm_jax.accel import sharding


@flax.struct.dataclass
class RealData:
    """Real training images kept on the device, class by class."""

    per_class: jax.Array    # (K or K_padded, Nmax, H, W, C) uint8, zero past counts[k]
    counts: jax.Array       # (K,) int32 images per class
    flat_index: jax.Array   # (Ntotal,) int32 index of every real image into K*Nmax
    mean: jax.Array         # (C,) float32, in [0,1] pixel units
    std: jax.Array          # (C,) float32

    @property
    def num_classes(self) -> int:
        return self.counts.shape[0]

    @property
    def class_images(self) -> jax.Array:
        """(K, Nmax, H, W, C) ``per_class`` without any padding classes."""
        k = self.num_classes
        return self.per_class if self.per_class.shape[0] == k else self.per_class[:k]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.per_class.shape[2:])

    @property
    def max_per_class(self) -> int:
        return self.per_class.shape[1]

    @staticmethod
    def layout(mesh: Mesh) -> "RealData":
        """Sharding prefix on ``mesh``: the class axis of ``per_class`` split, the rest whole."""
        rep = sharding.replicated(mesh)
        return RealData(per_class=sharding.split(mesh), counts=rep, flat_index=rep, mean=rep,
                        std=rep)


def _flat_index(counts) -> np.ndarray:
    nmax = int(np.max(counts))
    return np.concatenate([k * nmax + np.arange(n) for k, n in enumerate(counts)]).astype(np.int32)


def prepare_real(images: np.ndarray, labels: np.ndarray, mean, std,
                 num_classes: Optional[int] = None, mesh: Optional[Mesh] = None) -> RealData:
    """Sort a labelled uint8 NHWC image array into the per-class device layout.

    With ``mesh`` (``sharding.make_mesh``) the class axis is split over its devices straight from
    host memory (``shard_real``); without, everything goes to the default device.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"train images must be a uint8 (N, H, W, C) array, got {images.dtype} "
                         f"{images.shape}; pass raw pixels 0..255, the engine normalises them")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {labels.shape}")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if len(mean) != images.shape[-1] or len(std) != images.shape[-1]:
        raise ValueError(f"mean/std need {images.shape[-1]} channels, got {len(mean)}/{len(std)}")
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.min(std) > 0):
        raise ValueError(f"mean must be finite and std finite and > 0 (pixel units, per "
                         f"channel), got mean {list(mean)} and std {list(std)}")
    per_class, counts = data_lib.class_arrays(images, labels, num_classes)
    host = RealData(per_class=per_class, counts=counts.astype(np.int32),
                    flat_index=_flat_index(counts), mean=np.asarray(mean, np.float32),
                    std=np.asarray(std, np.float32))
    if mesh is not None:
        return shard_real(host, mesh)
    return jax.tree.map(jnp.asarray, host)


def shard_real(real: RealData, mesh: Mesh) -> RealData:
    """``RealData`` placed on ``mesh``: the class axis of ``per_class`` split over the devices.

    When the mesh size does not divide K, ``per_class`` gets empty (all-zero) classes appended up
    to ``sharding.padded_size(K, mesh)``; ``counts`` and ``flat_index`` are unchanged, so nothing
    ever samples them. Accepts host (NumPy) or device arrays; idempotent.
    """
    num_classes = int(real.counts.shape[0])
    target = sharding.padded_size(num_classes, mesh)
    per_class = real.per_class
    have = per_class.shape[0]
    if have not in (num_classes, target):
        raise ValueError(f"per_class has {have} classes but counts says {num_classes}; build the "
                         f"data with idm_jax.real.prepare_real")
    if have < target:
        pad = np.zeros((target - have,) + tuple(per_class.shape[1:]), per_class.dtype)
        per_class = np.concatenate([np.asarray(per_class), pad])
    return sharding.place(real.replace(per_class=per_class), RealData.layout(mesh))


def real_from_host_shard(images: np.ndarray, labels: np.ndarray, counts, mean, std,
                         mesh: Mesh) -> RealData:
    """Global ``RealData`` built from the classes this process loaded (``host_class_slice``).

    Args:
      images: (n, H, W, C) uint8 real images of this process's classes only.
      labels: (n,) their global class ids, all inside ``sharding.host_class_slice(K, mesh)``.
      counts: (K,) images per class of the whole train set (every host passes the same).
      mean, std: (C,) normalisation constants, [0,1] pixel units.

    Returns the same ``RealData`` as ``prepare_real(all images, ..., mesh=mesh)``.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    counts = np.asarray(counts, np.int64)
    num_classes = len(counts)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be a uint8 (n, H, W, C) array, got {images.dtype} "
                         f"{images.shape}")
    if (counts <= 0).any():
        raise ValueError(f"classes {np.flatnonzero(counts <= 0).tolist()} have no images")
    own = sharding.host_class_slice(num_classes, mesh)
    block = sharding.host_block(num_classes, mesh)
    if labels.shape != (len(images),):
        raise ValueError(f"labels must have shape ({len(images)},), got {labels.shape}")
    if len(labels) and (labels.min() < own.start or labels.max() >= own.stop):
        raise ValueError(f"this process owns classes {own.start}..{own.stop - 1} but got labels "
                         f"{labels.min()}..{labels.max()}; load host_class_slice(K, mesh) only")
    nmax = int(counts.max())
    local = np.zeros((block.stop - block.start, nmax) + images.shape[1:], np.uint8)
    for k in range(own.start, own.stop):
        picked = images[labels == k]
        if len(picked) != counts[k]:
            raise ValueError(f"class {k}: {len(picked)} images loaded but counts says {counts[k]}")
        local[k - block.start, :len(picked)] = picked
    global_shape = (sharding.padded_size(num_classes, mesh), nmax) + images.shape[1:]
    per_class = jax.make_array_from_process_local_data(sharding.split(mesh), local, global_shape)
    rest = RealData(per_class=None, counts=counts.astype(np.int32), flat_index=_flat_index(counts),
                    mean=np.asarray(mean, np.float32), std=np.asarray(std, np.float32))
    rep = sharding.replicated(mesh)
    placed = sharding.place(rest, RealData(per_class=None, counts=rep, flat_index=rep,
                                           mean=rep, std=rep))
    return placed.replace(per_class=per_class)


def to_float(real: RealData, pixels: jax.Array, normalize: bool) -> jax.Array:
    """uint8 pixels -> float32, normalised with the data's constants unless ``normalize`` is
    False (the ImageNet scripts' quirk: [0,1] pixels)."""
    x = pixels.astype(jnp.float32) / 255.0
    return (x - real.mean) / real.std if normalize else x


def class_batch_indices(key: jax.Array, counts: jax.Array, nmax: int, batch: int,
                        sampling: str = "random") -> tuple[jax.Array, jax.Array]:
    """Per-class real batch indices, drawn without replacement within each class.

    Returns (indices (K, batch) into each class's rows, mask (K, batch) bool). A class with fewer
    than ``batch`` images contributes all of them (the rest of its row is masked), as the official
    code uses the whole class then.
    """
    num_classes = counts.shape[0]
    positions = jnp.arange(batch)
    mask = positions[None, :] < counts[:, None]
    if sampling == "first":
        return jnp.broadcast_to(positions, (num_classes, batch)), mask
    scores = jax.random.uniform(key, (num_classes, nmax))
    scores = jnp.where(jnp.arange(nmax)[None, :] < counts[:, None], scores, -1.0)
    _, idx = jax.lax.top_k(scores, batch)   # a uniform random subset, valid rows first
    return idx, mask


def gather_class_batches(real: RealData, idx: jax.Array, normalize: bool) -> jax.Array:
    """Rows ``idx`` (K', B) of every class's images, as floats: (K', B, H, W, C).

    ``idx`` may cover the padding classes of a sharded ``per_class`` too; each device then
    gathers only its own classes' rows.
    """
    pixels = jnp.take_along_axis(real.per_class, idx.reshape(idx.shape + (1, 1, 1)), axis=1)
    return to_float(real, pixels, normalize)


def sample_all_classes(real: RealData, key: jax.Array, batch: int, normalize: bool = True):
    """A batch drawn without replacement from the whole train set: (images, labels).

    The ``batch`` images with the largest of iid uniform scores: a uniform random subset in
    random order, like the official ``randperm(N)[:batch]``. ``jax.random.choice(...,
    replace=False)`` draws the same distribution by shuffling all N indices (two sorts of N
    pairs), which profiled at 50x the cost of this ``top_k`` (BENCHMARKS.md).
    """
    scores = jax.random.uniform(key, real.flat_index.shape)
    picks = real.flat_index[jax.lax.top_k(scores, batch)[1]]
    flat = real.per_class.reshape((-1,) + real.image_shape)
    return (to_float(real, flat[picks], normalize),
            (picks // real.max_per_class).astype(jnp.int32))


__all__ = ["RealData", "prepare_real", "shard_real", "real_from_host_shard", "to_float",
           "class_batch_indices", "gather_class_batches", "sample_all_classes"]
