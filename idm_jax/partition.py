"""Partition-and-expand, IDM's way of getting several training images out of one stored image.

A stored synthetic image is cut into a ``factor x factor`` grid of pieces and every piece is
resized back to the full image size with bilinear interpolation at half-pixel centres (PyTorch's
``align_corners=False``). With the default ``factor=2`` one stored image yields four training
images, in matching and in evaluation (docs/FAITHFULNESS.md, "partition-and-expand").

``mosaic`` is the inverse used to initialise the synthetic set: it tiles ``factor**2`` real images,
each downscaled by an average pool, into one image (docs/FAITHFULNESS.md, "init").

When ``factor`` does not divide a side (3 on 32 pixels) the pieces along it differ by at most one
pixel: the cuts are the equal split rounded to whole pixels (``grid_cuts``: 11, 10, 11), the
mosaic downscales each real image into its piece by area averaging, and nothing of the image is
dropped. On divisible sizes the equal-piece code runs unchanged.

Piece order is column-major over the grid, as the official code: for ``factor=2`` the pieces are
top-left, bottom-left, top-right, bottom-right. Outputs are piece-major (all images' piece 0, then
all images' piece 1, ...), so labels of an expanded batch are ``tile(labels, factor**2)``.
"""

from __future__ import annotations

import jax.numpy as jnp


def _check_factor(height: int, width: int, factor: int) -> None:
    if factor < 1:
        raise ValueError(f"partition factor must be >= 1, got {factor}")
    if factor > min(height, width):
        raise ValueError(
            f"partition factor {factor} would cut {height}x{width} images into pieces of less "
            f"than one pixel; choose a factor of at most {min(height, width)}")


def grid_cuts(size: int, factor: int) -> tuple:
    """The ``factor + 1`` pixel boundaries of ``factor`` nearly equal pieces of a side of ``size``:
    ``floor(i * size / factor + 1/2)`` (the equal split rounded half up), so pieces differ by at
    most one pixel and cover the side. 32 / 3 -> (0, 11, 21, 32): pieces of 11, 10, 11."""
    return tuple((2 * i * size + factor) // (2 * factor) for i in range(factor + 1))


def _area_matrix(out_size: int, in_size: int) -> jnp.ndarray:
    """(out_size, in_size) averaging weights of PyTorch's ``adaptive_avg_pool``: output ``o``
    is the mean of inputs ``floor(o * in / out)`` to ``ceil((o + 1) * in / out) - 1``. On a
    divisible size this is the plain average pool."""
    rows = []
    for o in range(out_size):
        lo, hi = (o * in_size) // out_size, -((-(o + 1) * in_size) // out_size)
        rows.append([1.0 / (hi - lo) if lo <= i < hi else 0.0 for i in range(in_size)])
    return jnp.asarray(rows, jnp.float32)


def _pieces(row_cuts: tuple, col_cuts: tuple):
    """(r0, r1, c0, c1) of every piece of a grid, column-major (columns outer, rows inner)."""
    return [(r0, r1, c0, c1) for c0, c1 in zip(col_cuts[:-1], col_cuts[1:])
            for r0, r1 in zip(row_cuts[:-1], row_cuts[1:])]


def _grid_expand(images: jnp.ndarray, row_cuts: tuple, col_cuts: tuple) -> jnp.ndarray:
    """Every piece of the grid given by its pixel boundaries, resized back to full size:
    (N, H, W, C) -> (pieces * N, H, W, C), piece-major, column-major grid order."""
    _, height, width, _ = images.shape
    out = []
    for r0, r1, c0, c1 in _pieces(row_cuts, col_cuts):
        rows = _upsample_matrix(height, r1 - r0).astype(images.dtype)
        cols = _upsample_matrix(width, c1 - c0).astype(images.dtype)
        out.append(jnp.einsum("hp,bpqc,wq->bhwc", rows, images[:, r0:r1, c0:c1], cols))
    return jnp.concatenate(out)


def _upsample_matrix(out_size: int, in_size: int) -> jnp.ndarray:
    """(out_size, in_size) matrix of bilinear weights at half-pixel centres, edge-clamped.

    Row ``o`` holds the weights that PyTorch's ``interpolate(..., 'bilinear', align_corners=False)``
    gives to the input samples for output sample ``o``. Expressing the resize as a matrix product
    keeps it gather-free, which is exact and fast both ways (forward and gradient) on CPU and GPU.
    """
    scale = in_size / out_size
    src = (jnp.arange(out_size) + 0.5) * scale - 0.5
    src = jnp.clip(src, 0.0, in_size - 1)  # PyTorch clamps negative sources to 0
    lo = jnp.floor(src).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, in_size - 1)
    frac = src - lo
    eye = jnp.eye(in_size, dtype=jnp.float32)
    return eye[lo] * (1.0 - frac)[:, None] + eye[hi] * frac[:, None]


def partition_expand(images: jnp.ndarray, factor: int = 2) -> jnp.ndarray:
    """Cut each image into ``factor x factor`` pieces and resize each back to full size.

    Args:
      images: (N, H, W, C) float array; H and W at least ``factor``.
      factor: pieces per side (2 in IDM); one that does not divide a side gives pieces that
        differ by at most one pixel (``grid_cuts``).

    Returns:
      (factor*factor*N, H, W, C) array, piece-major: rows ``k*N .. (k+1)*N-1`` hold piece ``k`` of
      every image, pieces in column-major grid order (for 2: TL, BL, TR, BR).
    """
    n, height, width, channels = images.shape
    _check_factor(height, width, factor)
    if factor == 1:
        return images
    if height % factor or width % factor:
        return _grid_expand(images, grid_cuts(height, factor), grid_cuts(width, factor))
    ph, pw = height // factor, width // factor
    # (N, gh, ph, gw, pw, C) -> pieces indexed (gw, gh) for column-major grid order.
    grid = images.reshape(n, factor, ph, factor, pw, channels)
    pieces = jnp.transpose(grid, (3, 1, 0, 2, 4, 5))  # (gw, gh, N, ph, pw, C)
    pieces = pieces.reshape(factor * factor * n, ph, pw, channels)
    rows = _upsample_matrix(height, ph).astype(images.dtype)
    cols = _upsample_matrix(width, pw).astype(images.dtype)
    return jnp.einsum("hp,bpqc,wq->bhwc", rows, pieces, cols)


def partition_expand_labels(labels: jnp.ndarray, factor: int = 2) -> jnp.ndarray:
    """Labels of ``partition_expand(images, factor)``: (N,) -> (factor*factor*N,), tiled."""
    return jnp.tile(labels, factor * factor)


def mosaic(images: jnp.ndarray, factor: int = 2) -> jnp.ndarray:
    """Tile ``factor**2`` batches of images, each downscaled by ``factor``, into one batch.

    This is IDM's ``--init real --aug`` initialisation: piece ``k`` of output image ``n`` (same
    column-major grid order as ``partition_expand``) is ``images[k, n]`` average-pooled by
    ``factor``. For factor 2 an average pool equals PyTorch's bilinear x0.5 without antialias.
    On sides ``factor`` does not divide, image ``k`` is area-averaged into piece ``k`` of the
    ``grid_cuts`` grid.

    Args:
      images: (factor*factor, N, H, W, C) float array of real images.

    Returns:
      (N, H, W, C) array.
    """
    pieces, n, height, width, channels = images.shape
    if pieces != factor * factor:
        raise ValueError(
            f"mosaic with factor {factor} needs {factor * factor} images per output image "
            f"(leading axis), got {pieces}")
    _check_factor(height, width, factor)
    if height % factor or width % factor:
        return _uneven_mosaic(images, grid_cuts(height, factor), grid_cuts(width, factor))
    ph, pw = height // factor, width // factor
    pooled = images.reshape(pieces, n, ph, factor, pw, factor, channels).mean(axis=(3, 5))
    # Leading axis is (gw, gh) in column-major order; put it back onto the image grid.
    pooled = pooled.reshape(factor, factor, n, ph, pw, channels)  # (gw, gh, N, ph, pw, C)
    grid = jnp.transpose(pooled, (2, 1, 3, 0, 4, 5))  # (N, gh, ph, gw, pw, C)
    return grid.reshape(n, height, width, channels)


def _uneven_mosaic(images: jnp.ndarray, row_cuts: tuple, col_cuts: tuple) -> jnp.ndarray:
    """``mosaic`` on a grid of unequal pieces: (pieces, N, H, W, C) -> (N, H, W, C)."""
    _, _, height, width, _ = images.shape
    columns = {}
    for k, (r0, r1, c0, c1) in enumerate(_pieces(row_cuts, col_cuts)):
        rows = _area_matrix(r1 - r0, height).astype(images.dtype)
        cols = _area_matrix(c1 - c0, width).astype(images.dtype)
        columns.setdefault(c0, []).append(jnp.einsum("ph,bhwc,qw->bpqc", rows, images[k], cols))
    return jnp.concatenate([jnp.concatenate(col, axis=1) for col in columns.values()], axis=2)


# --------------------------------------------------------------------------- other partitions
# Options (the paper's open question 2); "uniform" with factor 2 is IDM.
SCHEMES = ("uniform", "multiscale", "nonuniform")


def pieces_per_image(scheme: str = "uniform", factor: int = 2) -> int:
    """Training images one stored image gives under ``scheme``."""
    if scheme == "uniform":
        return factor * factor
    if scheme == "multiscale":
        return 1 + factor * factor
    if scheme == "nonuniform":
        return 4
    raise ValueError(f"unknown partition scheme {scheme!r}; valid: {', '.join(SCHEMES)}")


def nonuniform_cuts(size: int, ratio: float) -> int:
    """Where a side of ``size`` pixels is cut for the non-uniform grid: ``round(ratio * size)``,
    which must leave at least one pixel on each side."""
    cut = int(round(ratio * size))
    if not 1 <= cut <= size - 1:
        raise ValueError(f"partition_ratio {ratio} cuts a side of {size} pixels at {cut}, "
                         f"leaving an empty piece; choose a ratio in ({1 / size:.3f}, "
                         f"{1 - 1 / size:.3f})")
    return cut


def nonuniform_expand(images: jnp.ndarray, ratio: float = 0.4) -> jnp.ndarray:
    """A 2x2 grid with unequal pieces: rows cut at ``round(ratio * H)``, columns at
    ``round(ratio * W)``; each piece resized back to H x W as in ``partition_expand``.

    (N, H, W, C) -> (4N, H, W, C), piece-major, column-major grid order (TL, BL, TR, BR): for
    ratio 0.4 the pieces are 0.4 x 0.4, 0.6 x 0.4, 0.4 x 0.6 and 0.6 x 0.6 of the image.
    """
    _, height, width, _ = images.shape
    return _grid_expand(images, (0, nonuniform_cuts(height, ratio), height),
                        (0, nonuniform_cuts(width, ratio), width))


def expand(images: jnp.ndarray, scheme: str = "uniform", factor: int = 2,
           ratio: float = 0.4) -> jnp.ndarray:
    """The training images of stored ``images`` (N, H, W, C) under a partition scheme.

    - ``uniform``: ``partition_expand(images, factor)`` (IDM), factor**2 per image;
    - ``multiscale``: each image whole, then its factor x factor pieces: 1 + factor**2;
    - ``nonuniform``: ``nonuniform_expand(images, ratio)``, 4 unequal pieces.

    Piece-major throughout, so the labels are ``tile(labels, pieces_per_image(...))``.
    """
    if scheme == "uniform":
        return partition_expand(images, factor)
    if scheme == "multiscale":
        return jnp.concatenate([images, partition_expand(images, factor)])
    if scheme == "nonuniform":
        return nonuniform_expand(images, ratio)
    raise ValueError(f"unknown partition scheme {scheme!r}; valid: {', '.join(SCHEMES)}")


def expand_labels(labels: jnp.ndarray, scheme: str = "uniform", factor: int = 2) -> jnp.ndarray:
    """Labels of ``expand(images, scheme, factor)``: (N,) -> (pieces * N,)."""
    return jnp.tile(labels, pieces_per_image(scheme, factor))


__all__ = ["partition_expand", "partition_expand_labels", "mosaic", "grid_cuts", "SCHEMES",
           "pieces_per_image", "nonuniform_cuts", "nonuniform_expand", "expand", "expand_labels"]
