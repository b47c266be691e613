"""The differentiable image transforms of DSA, each with explicit parameters.

These are the ops the augmentation groups of ``idm_jax.augment`` run: brightness, saturation and
contrast (the ``color`` group), integer translation (``crop``), ``cutout`` and ``flip`` (the
bilinear affine resamplings ``scale`` and ``rotate`` are in ``idm_jax.augment.resample``). Each is
differentiable with respect to the pixels and takes its random parameters as arguments, so tests
and other modules can call them with known values. ``DSAParams`` holds the ranges those
parameters are drawn from.

Images are NHWC, normalised (so 0 is roughly the dataset-mean colour; every "zero
fill" below fills with that colour). The per-op functions take explicit parameters.
Each parameter has shape ``(N,)`` (one value per image) or ``()`` (one value shared
by the batch), so tests and other modules can call them with known values.

Exact semantics of the official code that matter when reading this module:

* crop and cutout sizes are per axis: the row shift range and cutout height come
  from H, the column ones from W (``x.size(2)`` and ``x.size(3)`` in the PyTorch
  code). All datasets used are square, so this only matters for non-square inputs.
* ``tx`` moves the rows (H axis), ``ty`` moves the columns. Output pixel ``(i, j)``
  is input pixel ``(i + tx, j + ty)``, or 0 when that lies outside the image.
* The cutout hole is clamped to the image: rows
  ``clip(ox - L//2, 0, H-1) .. clip(ox - L//2 + L - 1, 0, H-1)``, and columns the
  same way with ``oy``.

Each op uses the fastest exact formulation measured (BENCHMARKS.md, "DSA ops"); translate and
flip are exact slicing.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DSAParams:
    """Ranges of the random DSA parameters (``ParamDiffAug`` defaults).

    Frozen and hashable, so it can be a static argument of ``jax.jit``.

    Attributes:
      prob_flip: probability of reversing the width axis.
      ratio_scale: ``sx, sy ~ U[1/ratio_scale, ratio_scale)``, drawn independently.
      ratio_rotate: rotation angle ``~ U[-ratio_rotate, ratio_rotate)`` in degrees.
      ratio_crop_pad: maximum shift is ``int(ratio_crop_pad * size + 0.5)`` pixels.
      ratio_cutout: hole side is ``int(ratio_cutout * size + 0.5)`` pixels.
      brightness: adds ``(u - 0.5) * brightness``, ``u ~ U[0, 1)``.
      saturation: multiplies the chroma by ``u * saturation``.
      contrast: multiplies the contrast by ``u + contrast``.
    """

    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5

    def __post_init__(self):
        if not 0.0 <= self.prob_flip <= 1.0:
            raise ValueError(f"prob_flip must lie in [0, 1], got {self.prob_flip}.")
        if self.ratio_scale <= 0.0:
            raise ValueError(f"ratio_scale must be positive, got {self.ratio_scale}.")
        if self.ratio_crop_pad < 0.0 or self.ratio_cutout < 0.0:
            raise ValueError(
                "ratio_crop_pad and ratio_cutout must be non-negative, got "
                f"{self.ratio_crop_pad} and {self.ratio_cutout}."
            )


# --------------------------------------------------------------------------- helpers
def crop_shift(size: int, ratio: float = DSAParams.ratio_crop_pad) -> int:
    """Maximum integer translation (pixels) for an axis of ``size`` pixels."""
    return int(size * ratio + 0.5)


def cutout_size(size: int, ratio: float = DSAParams.ratio_cutout) -> int:
    """Cutout hole side (pixels) along an axis of ``size`` pixels."""
    return int(size * ratio + 0.5)


def _check_images(x: Array) -> None:
    if x.ndim != 4:
        raise ValueError(f"Expected NHWC images of rank 4, got shape {tuple(x.shape)}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"Expected floating-point (normalised) images, got dtype {x.dtype}; "
            "convert and normalise them first."
        )


def _param(p, x: Array, name: str, dtype=None) -> Array:
    """Validates a per-image parameter: shape () (shared) or (N,) (per image)."""
    p = jnp.asarray(p, dtype=dtype)
    n = x.shape[0]
    if p.ndim > 1 or (p.ndim == 1 and p.shape[0] != n):
        raise ValueError(
            f"Parameter {name!r} must have shape () or ({n},) for a batch of {n} "
            f"images, got {tuple(p.shape)}."
        )
    return p


def _bcast(p: Array, x: Array) -> Array:
    """Reshapes a () or (N,) parameter so it broadcasts against NHWC ``x``."""
    return p.reshape(p.shape + (1,) * (x.ndim - p.ndim))


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"{name} must be an int or a pair (rows, cols), got {v!r}.")
        return int(v[0]), int(v[1])
    return int(v), int(v)


# ------------------------------------------------------------------------ colour ops


def brightness(x: Array, u, strength: float = DSAParams.brightness) -> Array:
    """Adds ``(u - 0.5) * strength`` to every pixel of each image.

    Args:
      x: (N, H, W, C) float images.
      u: (N,) or () uniform draws in [0, 1).
      strength: ``DSAParams.brightness``.

    Returns:
      (N, H, W, C), same dtype as ``x``.
    """
    _check_images(x)
    u = _param(u, x, "u", jnp.float32)
    return x + _bcast((u - 0.5) * strength, x).astype(x.dtype)


def saturation(x: Array, u, strength: float = DSAParams.saturation) -> Array:
    """Scales each pixel's deviation from its channel mean by ``u * strength``.

    ``m`` is the per-pixel mean over the C channels, and ``x <- (x - m) * u * s + m``.

    Args:
      x: (N, H, W, C) float images.
      u: (N,) or () uniform draws in [0, 1).
      strength: ``DSAParams.saturation``.

    Returns:
      (N, H, W, C), same dtype as ``x``.
    """
    _check_images(x)
    u = _param(u, x, "u", jnp.float32)
    # Sum of channel slices, not jnp.mean(axis=-1): XLA:CPU reduces a size-3 minor
    # axis about 20x slower than this (measured at (2560, 32, 32, 3)).
    c = x.shape[-1]
    m = sum(x[..., k : k + 1] for k in range(c)) / c
    return (x - m) * _bcast(u * strength, x).astype(x.dtype) + m


def contrast(x: Array, u, strength: float = DSAParams.contrast) -> Array:
    """Scales each image's deviation from its mean by ``u + strength``.

    ``m`` is the per-image mean over H, W and C, and ``x <- (x - m) * (u + s) + m``.

    Args:
      x: (N, H, W, C) float images.
      u: (N,) or () uniform draws in [0, 1).
      strength: ``DSAParams.contrast``.

    Returns:
      (N, H, W, C), same dtype as ``x``.
    """
    _check_images(x)
    u = _param(u, x, "u", jnp.float32)
    m = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    return (x - m) * _bcast(u + strength, x).astype(x.dtype) + m


# --------------------------------------------------------------------- geometric ops


def translate(x: Array, tx, ty, max_shift: int | tuple[int, int] | None = None) -> Array:
    """Integer translation with zero fill: ``out[i, j] = x[i + tx, j + ty]``.

    ``tx`` moves along the rows (H axis) and ``ty`` along the columns (W axis).
    Source pixels outside the image read as 0.

    Args:
      x: (N, H, W, C) float images.
      tx: (N,) or () integer row offsets.
      ty: (N,) or () integer column offsets.
      max_shift: static bound on ``|tx|`` and ``|ty|`` (an int, or a (rows, cols)
        pair), used to pad the image only as much as needed. Larger offsets are
        clamped to the bound, so pass a true bound. The default (None) pads by the
        full image size, which is exact for any offset.

    Returns:
      (N, H, W, C), same dtype as ``x``.
    """
    _check_images(x)
    n, h, w, c = x.shape
    tx = _param(tx, x, "tx", jnp.int32)
    ty = _param(ty, x, "ty", jnp.int32)
    if max_shift is None:
        ph, pw = h, w
    else:
        mh, mw = _pair(max_shift, "max_shift")
        ph, pw = min(max(mh, 0), h), min(max(mw, 0), w)
    # With the default padding (the full size) this clamp is exact: any offset of
    # the full size or more gives an empty image. With a bound it enforces the bound.
    tx = jnp.clip(tx, -ph, ph)
    ty = jnp.clip(ty, -pw, pw)
    xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    zero = jnp.zeros((), jnp.int32)
    if tx.ndim == 0 and ty.ndim == 0:
        return lax.dynamic_slice(xp, (zero, ph + tx, pw + ty, zero), (n, h, w, c))
    tx = jnp.broadcast_to(tx, (n,))
    ty = jnp.broadcast_to(ty, (n,))

    def one(img, a, b):
        return lax.dynamic_slice(img, (ph + a, pw + b, zero), (h, w, c))

    return jax.vmap(one)(xp, tx, ty)


def cutout(x: Array, ox, oy, size: int | tuple[int, int]) -> Array:
    """Zeros a square (or rectangular) hole centred at ``(ox, oy)``, clipped to the image.

    With side ``L`` (per axis), the zeroed rows are
    ``clip(ox - L//2, 0, H-1) .. clip(ox - L//2 + L - 1, 0, H-1)`` inclusive, and
    the columns follow the same rule with ``oy`` and W. This reproduces the official
    code, which clamps each index of the L x L window into the image.

    Args:
      x: (N, H, W, C) float images.
      ox: (N,) or () integer row centres.
      oy: (N,) or () integer column centres.
      size: hole side in pixels, an int or a (rows, cols) pair. ``dsa`` uses
        ``(cutout_size(H), cutout_size(W))``.

    Returns:
      (N, H, W, C), same dtype as ``x``. The hole is applied by multiplying with a 0/1
      mask, so its gradient is zero inside the hole and one outside.
    """
    _check_images(x)
    _, h, w, _ = x.shape
    lh, lw = _pair(size, "size")
    ox = _param(ox, x, "ox", jnp.int32)
    oy = _param(oy, x, "oy", jnp.int32)
    if lh <= 0 or lw <= 0:
        return x

    def covered(centre, side, extent):
        lo = jnp.clip(centre - side // 2, 0, extent - 1)[..., None]
        hi = jnp.clip(centre - side // 2 + side - 1, 0, extent - 1)[..., None]
        idx = jnp.arange(extent)
        return (idx >= lo) & (idx <= hi)  # (..., extent)

    rows = covered(ox, lh, h)
    cols = covered(oy, lw, w)
    hole = rows[..., :, None] & cols[..., None, :]  # (H, W) or (N, H, W)
    return x * jnp.logical_not(hole)[..., None].astype(x.dtype)


def flip(x: Array, do_flip) -> Array:
    """Reverses the width axis of the images where ``do_flip`` is true.

    Args:
      x: (N, H, W, C) float images.
      do_flip: (N,) or () booleans.

    Returns:
      (N, H, W, C), same dtype as ``x``.
    """
    _check_images(x)
    do_flip = _param(do_flip, x, "do_flip", jnp.bool_)
    return jnp.where(_bcast(do_flip, x), x[:, :, ::-1, :], x)


__all__ = ["DSAParams", "crop_shift", "cutout_size", "brightness", "saturation", "contrast",
           "translate", "cutout", "flip"]
