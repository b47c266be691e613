"""partition_expand and mosaic against a slow NumPy loop written from PyTorch's bilinear rule."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import idm_jax


def numpy_bilinear_resize(image, out_h, out_w):
    """Slow per-pixel bilinear resize, half-pixel centres, edge-clamped (align_corners=False)."""
    in_h, in_w, channels = image.shape
    out = np.zeros((out_h, out_w, channels), np.float64)
    for i in range(out_h):
        y = max((i + 0.5) * in_h / out_h - 0.5, 0.0)
        y0 = min(int(np.floor(y)), in_h - 1)
        y1 = min(y0 + 1, in_h - 1)
        wy = y - y0
        for j in range(out_w):
            x = max((j + 0.5) * in_w / out_w - 0.5, 0.0)
            x0 = min(int(np.floor(x)), in_w - 1)
            x1 = min(x0 + 1, in_w - 1)
            wx = x - x0
            out[i, j] = ((1 - wy) * (1 - wx) * image[y0, x0] + (1 - wy) * wx * image[y0, x1]
                         + wy * (1 - wx) * image[y1, x0] + wy * wx * image[y1, x1])
    return out


def numpy_partition_expand(images, factor):
    n, h, w, _ = images.shape
    ph, pw = h // factor, w // factor
    out = []
    for gx in range(factor):          # column-major grid: columns outer,
        for gy in range(factor):      # rows inner -> TL, BL, TR, BR for factor 2
            for b in range(n):
                piece = images[b, gy * ph:(gy + 1) * ph, gx * pw:(gx + 1) * pw]
                out.append(numpy_bilinear_resize(piece, h, w))
    return np.stack(out)


class PartitionExpandTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_numpy_loop(self):
        rng = np.random.default_rng(0)
        for shape, factor in [((3, 8, 8, 3), 2), ((2, 6, 10, 1), 2), ((2, 9, 6, 2), 3)]:
            images = rng.normal(size=shape).astype(np.float32)
            fn = self.variant(lambda x, f=factor: idm_jax.partition_expand(x, factor=f))
            got = np.asarray(fn(images))
            want = numpy_partition_expand(images.astype(np.float64), factor)
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"{shape} factor {factor}")

    def test_piece_order_is_column_major(self):
        # An image whose quadrants are constants 1 (TL), 2 (TR), 3 (BL), 4 (BR).
        image = np.zeros((1, 4, 4, 1), np.float32)
        image[0, :2, :2], image[0, :2, 2:], image[0, 2:, :2], image[0, 2:, 2:] = 1, 2, 3, 4
        out = np.asarray(idm_jax.partition_expand(jnp.asarray(image)))
        np.testing.assert_allclose(out[:, 0, 0, 0], [1, 3, 2, 4])  # TL, BL, TR, BR
        np.testing.assert_allclose(out.reshape(4, -1).std(axis=1), 0, atol=1e-6)

    def test_piece_major_layout_and_labels(self):
        rng = np.random.default_rng(1)
        images = rng.normal(size=(5, 4, 4, 2)).astype(np.float32)
        out = idm_jax.partition_expand(images)
        chex.assert_shape(out, (20, 4, 4, 2))
        labels = idm_jax.partition_expand_labels(jnp.arange(5))
        np.testing.assert_array_equal(labels, np.tile(np.arange(5), 4))
        # Block k, row b comes from image b only.
        for b in range(5):
            single = idm_jax.partition_expand(images[b:b + 1])
            np.testing.assert_allclose(np.asarray(out)[b::5], np.asarray(single), atol=1e-6)

    def test_a_factor_larger_than_a_side_raises(self):
        with pytest.raises(ValueError, match="at most 7"):
            idm_jax.partition_expand(jnp.zeros((1, 7, 8, 3)), factor=8)
        with pytest.raises(ValueError, match="at most 5"):
            idm_jax.mosaic(jnp.zeros((36, 1, 8, 5, 3)), factor=6)

    def test_gradient_is_transpose_of_resize(self):
        # partition_expand is linear, so <PE(x), y> == <x, PE^T(y)> for the VJP.
        rng = np.random.default_rng(2)
        x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
        y = jnp.asarray(rng.normal(size=(8, 8, 8, 3)), jnp.float32)
        _, vjp = jax.vjp(idm_jax.partition_expand, x)
        (xt,) = vjp(y)
        lhs = float(jnp.vdot(idm_jax.partition_expand(x), y))
        rhs = float(jnp.vdot(x, xt))
        np.testing.assert_allclose(lhs, rhs, rtol=1e-4)

    def test_compiles_once(self):
        fn = jax.jit(chex.assert_max_traces(idm_jax.partition_expand, n=1))
        for seed in range(3):
            fn(jax.random.normal(jax.random.PRNGKey(seed), (2, 8, 8, 3)))


class MosaicTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_mosaic_then_expand_gives_pooled_pieces(self):
        rng = np.random.default_rng(3)
        real = rng.normal(size=(4, 3, 8, 8, 3)).astype(np.float32)
        syn = self.variant(idm_jax.mosaic)(real)
        chex.assert_shape(syn, (3, 8, 8, 3))
        expanded = np.asarray(idm_jax.partition_expand(syn))
        for k in range(4):
            for n in range(3):
                pooled = real[k, n].reshape(4, 2, 4, 2, 3).mean(axis=(1, 3))
                want = numpy_bilinear_resize(pooled.astype(np.float64), 8, 8)
                np.testing.assert_allclose(expanded[k * 3 + n], want, atol=1e-5)

    def test_quadrant_placement(self):
        # Piece k of the mosaic is images[k] pooled, at TL, BL, TR, BR for k = 0, 1, 2, 3.
        real = np.stack([np.full((1, 4, 4, 1), v, np.float32) for v in (1, 2, 3, 4)])
        syn = np.asarray(idm_jax.mosaic(real))[0, :, :, 0]
        np.testing.assert_allclose(syn[:2, :2], 1)
        np.testing.assert_allclose(syn[2:, :2], 2)
        np.testing.assert_allclose(syn[:2, 2:], 3)
        np.testing.assert_allclose(syn[2:, 2:], 4)

    def test_wrong_piece_count_raises(self):
        with pytest.raises(ValueError, match="needs 4"):
            idm_jax.mosaic(jnp.zeros((3, 1, 8, 8, 3)))


# ------------------------------------------------------------------ other partition schemes
def np_resize(piece, out_h, out_w):
    """Bilinear resize at half-pixel centres (PyTorch align_corners=False), one loop per pixel."""
    in_h, in_w = piece.shape[:2]

    def taps(o, out_size, in_size):
        src = max((o + 0.5) * in_size / out_size - 0.5, 0.0)
        lo = int(np.floor(src))
        hi = min(lo + 1, in_size - 1)
        return lo, hi, src - lo

    out = np.zeros((out_h, out_w) + piece.shape[2:], np.float64)
    for i in range(out_h):
        r0, r1, fr = taps(i, out_h, in_h)
        for j in range(out_w):
            c0, c1, fc = taps(j, out_w, in_w)
            out[i, j] = ((1 - fr) * (1 - fc) * piece[r0, c0] + (1 - fr) * fc * piece[r0, c1]
                         + fr * (1 - fc) * piece[r1, c0] + fr * fc * piece[r1, c1])
    return out


def test_nonuniform_pieces_equal_a_numpy_crop_and_resize():
    from idm_jax import partition
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 10, 15, 3)).astype(np.float32)
    got = np.asarray(partition.nonuniform_expand(images, 0.4))
    h0, w0 = 4, 6                                             # round(0.4 * 10), round(0.4 * 15)
    crops = [(slice(0, h0), slice(0, w0)), (slice(h0, 10), slice(0, w0)),     # TL, BL
             (slice(0, h0), slice(w0, 15)), (slice(h0, 10), slice(w0, 15))]   # TR, BR
    assert got.shape == (8, 10, 15, 3)
    for k, (rows, cols) in enumerate(crops):
        for n in range(2):
            np.testing.assert_allclose(got[k * 2 + n], np_resize(images[n, rows, cols], 10, 15),
                                       rtol=1e-5, atol=1e-5)


def test_nonuniform_at_one_half_is_the_uniform_grid_and_empty_pieces_are_refused():
    from idm_jax import partition
    images = np.random.default_rng(1).normal(size=(3, 8, 8, 2)).astype(np.float32)
    np.testing.assert_allclose(partition.nonuniform_expand(images, 0.5),
                               partition.partition_expand(images, 2), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="empty piece"):
        partition.nonuniform_expand(images, 0.05)


def test_multiscale_is_the_whole_images_then_their_pieces_with_tiled_labels():
    from idm_jax import partition
    images = np.random.default_rng(2).normal(size=(4, 8, 8, 3)).astype(np.float32)
    labels = np.array([0, 0, 1, 2])
    got = np.asarray(partition.expand(images, "multiscale", 2))
    assert got.shape == (20, 8, 8, 3) and partition.pieces_per_image("multiscale", 2) == 5
    np.testing.assert_array_equal(got[:4], images)
    np.testing.assert_allclose(got[4:], partition.partition_expand(images, 2), rtol=1e-6)
    np.testing.assert_array_equal(partition.expand_labels(labels, "multiscale", 2),
                                  np.tile(labels, 5))
    np.testing.assert_array_equal(partition.expand(images, "uniform", 2),
                                  partition.partition_expand(images, 2))


# ------------------------------------------------------------------ factors that do not divide
def numpy_area_resize(image, out_h, out_w):
    """PyTorch's adaptive average pool, one loop per output pixel: output (i, j) is the mean of
    rows floor(i*H/out_h) .. ceil((i+1)*H/out_h)-1 and the same for columns."""
    in_h, in_w = image.shape[:2]
    out = np.zeros((out_h, out_w) + image.shape[2:], np.float64)
    for i in range(out_h):
        r0, r1 = int(np.floor(i * in_h / out_h)), int(np.ceil((i + 1) * in_h / out_h))
        for j in range(out_w):
            c0, c1 = int(np.floor(j * in_w / out_w)), int(np.ceil((j + 1) * in_w / out_w))
            out[i, j] = image[r0:r1, c0:c1].mean(axis=(0, 1))
    return out


def test_grid_cuts_round_the_equal_split():
    from idm_jax import partition
    assert partition.grid_cuts(32, 3) == (0, 11, 21, 32)            # 10.67 -> 11, 21.33 -> 21
    assert partition.grid_cuts(32, 2) == (0, 16, 32)
    assert partition.grid_cuts(10, 4) == (0, 3, 5, 8, 10)            # 2.5 -> 3, 7.5 -> 8
    for size in range(3, 40):
        for factor in range(1, min(size, 6) + 1):
            cuts = partition.grid_cuts(size, factor)
            widths = np.diff(cuts)
            assert cuts[0] == 0 and cuts[-1] == size and widths.min() >= 1
            assert widths.max() - widths.min() <= 1, (size, factor, cuts)


def numpy_uneven_expand(images, row_bounds, col_bounds):
    n, h, w, _ = images.shape
    return np.stack([numpy_bilinear_resize(images[b, r0:r1, c0:c1].astype(np.float64), h, w)
                     for c0, c1 in col_bounds for r0, r1 in row_bounds for b in range(n)])


# Rows and columns cut differently, and one side divisible, so that swapping the sides fails.
UNEVEN = [((2, 32, 32, 3), [(0, 11), (11, 21), (21, 32)], [(0, 11), (11, 21), (21, 32)]),
          ((2, 32, 20, 3), [(0, 11), (11, 21), (21, 32)], [(0, 7), (7, 13), (13, 20)]),
          ((1, 9, 8, 2), [(0, 3), (3, 6), (6, 9)], [(0, 3), (3, 5), (5, 8)])]


@pytest.mark.parametrize("shape, rows, cols", UNEVEN)
def test_factor_3_cuts_the_rounded_split_and_resizes_each_piece(shape, rows, cols):
    # 32 / 3 -> pieces of 11, 10, 11; 20 / 3 -> 7, 6, 7; 9 / 3 -> 3, 3, 3; 8 / 3 -> 3, 2, 3.
    images = np.random.default_rng(4).normal(size=shape).astype(np.float32)
    got = np.asarray(jax.jit(lambda x: idm_jax.partition_expand(x, factor=3))(images))
    assert got.shape == (9 * shape[0],) + shape[1:]
    np.testing.assert_allclose(got, numpy_uneven_expand(images, rows, cols), atol=1e-5)


@pytest.mark.parametrize("shape, rows, cols", UNEVEN)
def test_uneven_mosaic_area_downscales_each_image_into_its_piece(shape, rows, cols):
    real = np.random.default_rng(5).normal(size=(9,) + shape).astype(np.float32)
    syn = np.asarray(idm_jax.mosaic(real, factor=3))
    assert syn.shape == shape
    k = 0
    for c0, c1 in cols:                        # column-major: columns outer, rows inner
        for r0, r1 in rows:
            for n in range(shape[0]):
                want = numpy_area_resize(real[k, n].astype(np.float64), r1 - r0, c1 - c0)
                np.testing.assert_allclose(syn[n, r0:r1, c0:c1], want, atol=1e-5)
            k += 1


def test_the_validator_takes_a_factor_that_does_not_divide_and_refuses_one_beyond_a_side():
    from idm_jax import validate
    from idm_jax.config import Config
    validate.check_config(Config(partition_factor=3), (32, 32, 3))
    validate.check_config(Config(partition_factor=3, partition="multiscale"), (32, 20, 3))
    with pytest.raises(validate.InvalidRun, match="at most 20"):
        validate.check_config(Config(partition_factor=21), (32, 20, 3))


def test_the_uneven_paths_reduce_to_the_equal_ones_on_divisible_sizes():
    from idm_jax import partition
    rng = np.random.default_rng(6)
    images = rng.normal(size=(3, 12, 12, 2)).astype(np.float32)
    real = rng.normal(size=(9, 3, 12, 12, 2)).astype(np.float32)
    for factor in (2, 3, 4):
        cuts = partition.grid_cuts(12, factor)
        np.testing.assert_allclose(partition._grid_expand(images, cuts, cuts),
                                   partition.partition_expand(images, factor), atol=1e-6)
    cuts = partition.grid_cuts(12, 3)
    np.testing.assert_allclose(partition._uneven_mosaic(real, cuts, cuts),
                               partition.mosaic(real, 3), atol=1e-6)
