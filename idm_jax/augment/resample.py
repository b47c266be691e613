"""Bilinear affine resampling for DSA's ``scale`` and ``rotate`` ops, with explicit parameters.

The ops resample like PyTorch's ``F.affine_grid`` + ``F.grid_sample`` with bilinear
interpolation, zero padding and ``align_corners=False`` (PyTorch's default, which the official
code relies on). Images are NHWC and normalised, so the zero fill is the dataset-mean colour;
each parameter has shape ``(N,)`` (one value per image) or ``()`` (shared by the batch), as in
``idm_jax.augment.transforms``, whose input checks these ops share. Interpolation weights are
computed in float32 from exact pixel-centre offsets, so an identity theta reproduces the input
exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from idm_jax.augment.transforms import _check_images, _param

Array = jax.Array


def _tent(d: Array) -> Array:
    """Bilinear (hat) kernel: weight of a sample at signed distance ``d`` pixels."""
    return jnp.maximum(0.0, 1.0 - jnp.abs(d))


def _centred_pixels(size: int) -> Array:
    """Pixel-centre positions relative to the image centre: ``k + 0.5 - size/2``.

    This is ``x_n * size / 2`` for the normalised centre ``x_n = (2k+1)/size - 1``,
    but exact in float32, so an identity transform reproduces the input exactly.
    """
    return jnp.arange(size, dtype=jnp.float32) + (0.5 - size / 2.0)


def scale_theta(sx, sy) -> Array:
    """Affine matrices ``[[sx, 0, 0], [0, sy, 0]]``, shape ``sx.shape + (2, 3)``."""
    sx, sy = jnp.broadcast_arrays(jnp.asarray(sx, jnp.float32), jnp.asarray(sy, jnp.float32))
    z = jnp.zeros_like(sx)
    return jnp.stack([jnp.stack([sx, z, z], -1), jnp.stack([z, sy, z], -1)], -2)


def rotate_theta(angle) -> Array:
    """Affine matrices ``[[cos a, -sin a, 0], [sin a, cos a, 0]]`` (``a`` in radians)."""
    a = jnp.asarray(angle, jnp.float32)
    c, s, z = jnp.cos(a), jnp.sin(a), jnp.zeros_like(a)
    return jnp.stack([jnp.stack([c, -s, z], -1), jnp.stack([s, c, z], -1)], -2)


def scale(x: Array, sx, sy) -> Array:
    """Affine scaling by ``theta = [[sx, 0, 0], [0, sy, 0]]`` with bilinear resampling.

    Same as ``affine_sample(x, scale_theta(sx, sy))``. ``sx > 1`` samples a wider
    region, so the content shrinks (zoom out). The map is separable and could be two
    small interpolation-matrix products. The 4-tap gather measured as fast or faster
    forward (much faster at 224 x 224), and most calls are forward-only (real
    batches, evaluation), so the gather is used.

    Args:
      x: (N, H, W, C) float images.
      sx: (N,) or () column (x) scale factors.
      sy: (N,) or () row (y) scale factors.

    Returns:
      (N, H, W, C), same dtype as ``x``.
    """
    _check_images(x)
    sx = _param(sx, x, "sx", jnp.float32)
    sy = _param(sy, x, "sy", jnp.float32)
    return affine_sample(x, scale_theta(sx, sy))


def _bilinear_taps(theta: Array, h: int, w: int):
    """The 4 bilinear taps of every output pixel for affine matrices ``theta``.

    Args:
      theta: (..., 2, 3) float32.

    Returns:
      A list of 4 ``(flat_index, weight)`` pairs, each of shape (..., H*W). The
      index is ``row * W + col`` clamped into the image. The weight is 0 for a tap
      outside the image (zero padding).
    """
    # ix = ((x_s + 1) W - 1) / 2 with x_s = theta . (x_n, y_n, 1), rewritten with
    # u = x_n W / 2 and v = y_n H / 2 (exact pixel-centre offsets) for accuracy:
    # ix = t00 u + t01 (W/H) v + t02 W/2 + (W-1)/2, and likewise for iy.
    u = _centred_pixels(w)[None, :]  # (1, W)
    v = _centred_pixels(h)[:, None]  # (H, 1)
    t = theta[..., None, None]  # (..., 2, 3, 1, 1)
    t00, t01, t02 = t[..., 0, 0, :, :], t[..., 0, 1, :, :], t[..., 0, 2, :, :]
    t10, t11, t12 = t[..., 1, 0, :, :], t[..., 1, 1, :, :], t[..., 1, 2, :, :]
    ix = t00 * u + (t01 * (w / h)) * v + (t02 * (w / 2.0) + (w - 1) / 2.0)
    iy = (t10 * (h / w)) * u + t11 * v + (t12 * (h / 2.0) + (h - 1) / 2.0)
    ix = ix.reshape(ix.shape[:-2] + (h * w,))
    iy = iy.reshape(iy.shape[:-2] + (h * w,))
    x0 = jnp.floor(ix)
    y0 = jnp.floor(iy)
    fx = ix - x0
    fy = iy - y0
    taps = []
    for dy, wy in ((0.0, 1.0 - fy), (1.0, fy)):
        for dx, wx in ((0.0, 1.0 - fx), (1.0, fx)):
            col = x0 + dx
            row = y0 + dy
            inside = (col >= 0) & (col <= w - 1) & (row >= 0) & (row <= h - 1)
            idx = (jnp.clip(row, 0, h - 1) * w + jnp.clip(col, 0, w - 1)).astype(jnp.int32)
            taps.append((idx, jnp.where(inside, wy * wx, 0.0)))
    return taps


def affine_sample(x: Array, theta) -> Array:
    """Bilinear affine resampling, equal to ``grid_sample(x, affine_grid(theta))``.

    Uses zero padding and ``align_corners=False``. For output pixel ``(i, j)`` of an
    H x W image: ``x_n = (2j+1)/W - 1`` and ``y_n = (2i+1)/H - 1``, then
    ``(x_s, y_s) = theta @ (x_n, y_n, 1)``, and the source position is
    ``ix = ((x_s+1) W - 1)/2`` (column), ``iy = ((y_s+1) H - 1)/2`` (row). The 4
    neighbours are interpolated bilinearly; a neighbour outside the image counts 0.

    Args:
      x: (N, H, W, C) float images.
      theta: (2, 3) or (1, 2, 3), shared by all images; or (N, 2, 3), per image.

    Returns:
      (N, H, W, C), same dtype as ``x``. Differentiable in ``x`` (and in ``theta``
      almost everywhere).
    """
    _check_images(x)
    n, h, w, c = x.shape
    theta = jnp.asarray(theta, jnp.float32)
    if theta.shape == (1, 2, 3):
        theta = theta[0]
    if theta.shape not in ((2, 3), (n, 2, 3)):
        raise ValueError(
            f"theta must have shape (2, 3), (1, 2, 3) or ({n}, 2, 3), got {tuple(theta.shape)}."
        )
    taps = _bilinear_taps(theta, h, w)
    if theta.ndim == 2:
        # Shared transform: gather whole pixel rows of an (H*W, N*C) layout. Few,
        # long rows make both the gather and its transpose (scatter-add) cheap.
        rows = jnp.transpose(x.reshape(n, h * w, c), (1, 0, 2)).reshape(h * w, n * c)
        out = sum(
            wt.astype(x.dtype)[:, None] * rows.at[idx].get(mode="promise_in_bounds")
            for idx, wt in taps
        )
        return jnp.transpose(out.reshape(h * w, n, c), (1, 0, 2)).reshape(n, h, w, c)
    # Per-image transform: gather C-vectors from a flat (N*H*W, C) array.
    flat = x.reshape(n * h * w, c)
    base = (jnp.arange(n, dtype=jnp.int32) * (h * w))[:, None]
    out = sum(
        wt.astype(x.dtype).reshape(-1, 1)
        * flat.at[(base + idx).reshape(-1)].get(mode="promise_in_bounds")
        for idx, wt in taps
    )
    return out.reshape(n, h, w, c)


def rotate(x: Array, angle) -> Array:
    """Rotation about the image centre by ``angle`` radians (bilinear, zero fill).

    Same as ``affine_sample(x, rotate_theta(angle))``.

    Args:
      x: (N, H, W, C) float images.
      angle: (N,) or () angles in radians.

    Returns:
      (N, H, W, C), same dtype as ``x``.
    """
    _check_images(x)
    angle = _param(angle, x, "angle", jnp.float32)
    return affine_sample(x, rotate_theta(angle))


__all__ = ["scale", "rotate", "scale_theta", "rotate_theta", "affine_sample"]
