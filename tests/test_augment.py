"""Tests for idm_jax.augment (DSA).

Every op is checked against a NumPy reference written independently from the
formulas of reference section 3.5 (per-pixel loops, not the vectorised tent/gather
code of the module). The dsa() tests check the Siamese contract, the group choice,
jit/vmap behaviour and gradients.
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idm_jax import augment as A

SINGLE_GROUPS = ("color", "crop", "cutout", "flip", "scale", "rotate")

# Jitted entry points for the formula tests: eager op-by-op dispatch would compile
# every primitive separately and dominate the runtime of this file.
_affine = jax.jit(A.affine_sample)
_scale = jax.jit(A.scale)
_rotate = jax.jit(A.rotate)
_translate = jax.jit(A.translate, static_argnames="max_shift")
_cutout = jax.jit(A.cutout, static_argnames="size")


def _images(seed, shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ----------------------------------------------------------------- NumPy references


def np_grid_sample(x, theta):
    """affine_grid + grid_sample (bilinear, zeros, align_corners=False), pixel by pixel."""
    x = np.asarray(x, np.float64)
    theta = np.broadcast_to(np.asarray(theta, np.float64), (x.shape[0], 2, 3))
    n, h, w, c = x.shape
    out = np.zeros_like(x)
    for b in range(n):
        t = theta[b]
        for i in range(h):
            for j in range(w):
                xn = (2 * j + 1) / w - 1
                yn = (2 * i + 1) / h - 1
                xs = t[0, 0] * xn + t[0, 1] * yn + t[0, 2]
                ys = t[1, 0] * xn + t[1, 1] * yn + t[1, 2]
                ix = ((xs + 1) * w - 1) / 2
                iy = ((ys + 1) * h - 1) / 2
                x0, y0 = math.floor(ix), math.floor(iy)
                ax, ay = ix - x0, iy - y0
                acc = np.zeros(c)
                for r, wr in ((y0, 1 - ay), (y0 + 1, ay)):
                    for q, wq in ((x0, 1 - ax), (x0 + 1, ax)):
                        if 0 <= r < h and 0 <= q < w:
                            acc += wr * wq * x[b, r, q]
                out[b, i, j] = acc
    return out


def np_translate(x, tx, ty):
    n, h, w, _ = x.shape
    tx = np.broadcast_to(tx, (n,))
    ty = np.broadcast_to(ty, (n,))
    out = np.zeros_like(x)
    for b in range(n):
        for i in range(h):
            for j in range(w):
                si, sj = i + tx[b], j + ty[b]
                if 0 <= si < h and 0 <= sj < w:
                    out[b, i, j] = x[b, si, sj]
    return out


def np_cutout(x, ox, oy, lh, lw):
    """Mirrors the official code: clamp each index of the L x L window, zero it."""
    n, h, w, _ = x.shape
    ox = np.broadcast_to(ox, (n,))
    oy = np.broadcast_to(oy, (n,))
    mask = np.ones((n, h, w), x.dtype)
    for b in range(n):
        for a in range(lh):
            for d in range(lw):
                r = min(max(ox[b] + a - lh // 2, 0), h - 1)
                q = min(max(oy[b] + d - lw // 2, 0), w - 1)
                mask[b, r, q] = 0
    return x * mask[..., None]


def np_rotation(angles):
    a = np.asarray(angles, np.float64)
    return np.stack(
        [np.stack([np.cos(a), -np.sin(a), 0 * a], -1), np.stack([np.sin(a), np.cos(a), 0 * a], -1)],
        -2,
    )


def np_scaling(sx, sy):
    sx, sy = np.asarray(sx, np.float64), np.asarray(sy, np.float64)
    z = 0 * sx
    return np.stack([np.stack([sx, z, z], -1), np.stack([z, sy, z], -1)], -2)


# ------------------------------------------------------------------ params/strategy


def test_params_defaults_and_hashable():
    p = A.DSAParams()
    assert (p.prob_flip, p.ratio_scale, p.ratio_rotate, p.ratio_crop_pad) == (0.5, 1.2, 15.0, 0.125)
    assert (p.ratio_cutout, p.brightness, p.saturation, p.contrast) == (0.5, 1.0, 2.0, 0.5)
    assert hash(p) == hash(A.DSAParams())
    assert p != A.DSAParams(ratio_rotate=30.0)
    f = jax.jit(A.dsa, static_argnames=("strategy", "siamese", "params"))
    x = jnp.ones((2, 8, 8, 3))
    y = f(jax.random.key(0), x, strategy="rotate", params=A.DSAParams(ratio_rotate=5.0))
    chex.assert_shape(y, x.shape)
    with pytest.raises(ValueError, match="prob_flip"):
        A.DSAParams(prob_flip=1.5)


def test_parse_strategy_and_errors():
    assert A.parse_strategy(A.DEFAULT_STRATEGY) == SINGLE_GROUPS
    assert A.parse_strategy("crop_crop_flip") == ("crop", "crop", "flip")
    for ident in ("", "none", "None", None):
        assert A.parse_strategy(ident) == ()
    x = jnp.asarray(_images(0, (2, 8, 8, 3)))
    for bad in ("color_blur", "color__crop", "Color"):
        with pytest.raises(ValueError, match="Valid ops are"):
            A.dsa(jax.random.key(0), x, bad)
        with pytest.raises(ValueError, match="rotate"):  # the message lists the valid ops
            jax.jit(lambda k, im: A.dsa(k, im, bad))(jax.random.key(0), x)
    with pytest.raises(ValueError, match="NHWC"):
        A.dsa(jax.random.key(0), x[0])
    with pytest.raises(ValueError, match="floating"):
        A.dsa(jax.random.key(0), jnp.zeros((2, 8, 8, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"shape \(\) or \(2,\)"):
        A.translate(x, jnp.zeros(3, jnp.int32), 0)


def test_identity_strategies_return_input():
    x = jnp.asarray(_images(1, (3, 8, 8, 3)))
    for ident in ("", "none", "None"):
        chex.assert_trees_all_equal(A.dsa(jax.random.key(5), x, ident), x)
        chex.assert_trees_all_equal(A.dsa(jax.random.key(5), x, ident, siamese=False), x)


def test_sizes_follow_reference():
    assert [A.crop_shift(s) for s in (32, 64, 224, 28)] == [4, 8, 28, 4]
    assert [A.cutout_size(s) for s in (32, 64, 224, 28, 30)] == [16, 32, 112, 14, 15]


# ------------------------------------------------------------------- per-op formulas


def test_flip_exact():
    x = _images(2, (4, 5, 7, 3))
    do = np.array([True, False, True, False])
    got = np.asarray(A.flip(jnp.asarray(x), jnp.asarray(do)))
    want = np.stack([x[b][:, ::-1] if do[b] else x[b] for b in range(4)])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(A.flip(jnp.asarray(x), True)), x[:, :, ::-1])
    np.testing.assert_array_equal(np.asarray(A.flip(jnp.asarray(x), False)), x)


@pytest.mark.parametrize("hw", [(32, 32), (16, 24)])
def test_translate_matches_numpy_shift_loop(hw):
    h, w = hw
    x = _images(3, (6, h, w, 3))
    rng = np.random.default_rng(4)
    sh, sw = A.crop_shift(h), A.crop_shift(w)
    tx = rng.integers(-sh, sh + 1, size=6)
    ty = rng.integers(-sw, sw + 1, size=6)
    tx[:2], ty[:2] = [sh, -sh], [-sw, sw]  # extremes
    got = _translate(jnp.asarray(x), jnp.asarray(tx), jnp.asarray(ty), max_shift=(sh, sw))
    np.testing.assert_array_equal(np.asarray(got), np_translate(x, tx, ty))
    # Without a bound, any offset is exact, including ones past the border.
    big_tx = np.array([h + 3, -h, 0, 1, -(h - 1), 2])
    big_ty = np.array([0, 1, -(w + 5), w - 1, 0, -2])
    got = _translate(jnp.asarray(x), jnp.asarray(big_tx), jnp.asarray(big_ty))
    np.testing.assert_array_equal(np.asarray(got), np_translate(x, big_tx, big_ty))
    # A shared scalar offset.
    got = _translate(jnp.asarray(x), 2, -3, max_shift=(sh, sw))
    np.testing.assert_array_equal(np.asarray(got), np_translate(x, 2, -3))


@pytest.mark.parametrize(
    "hw,side", [((32, 32), (16, 16)), ((30, 30), (15, 15)), ((16, 24), (8, 12))]
)
def test_cutout_matches_numpy_loop(hw, side):
    h, w = hw
    lh, lw = side
    x = _images(5, (8, h, w, 2))
    rng = np.random.default_rng(6)
    ox = rng.integers(0, h + (1 - lh % 2), size=8)
    oy = rng.integers(0, w + (1 - lw % 2), size=8)
    ox[:4] = [0, h + (1 - lh % 2) - 1, 0, lh // 2]  # corners and edges exercise the clipping
    oy[:4] = [0, w + (1 - lw % 2) - 1, w - 1, lw // 2]
    got = _cutout(jnp.asarray(x), jnp.asarray(ox), jnp.asarray(oy), (lh, lw))
    np.testing.assert_array_equal(np.asarray(got), np_cutout(x, ox, oy, lh, lw))
    got = _cutout(jnp.asarray(x), 3, 5, (lh, lw))
    np.testing.assert_array_equal(np.asarray(got), np_cutout(x, 3, 5, lh, lw))


def test_cutout_square_int_size():
    x = _images(7, (2, 32, 32, 3))
    ox, oy = np.array([16, 32]), np.array([0, 10])
    got = _cutout(jnp.asarray(x), jnp.asarray(ox), jnp.asarray(oy), 16)
    np.testing.assert_array_equal(np.asarray(got), np_cutout(x, ox, oy, 16, 16))
    # Reference rule: ox = 32 zeros rows 24..31 only.
    zero_rows = np.where(np.all(np.asarray(got)[1, :, 10:14] == 0, axis=(1, 2)))[0]
    np.testing.assert_array_equal(zero_rows, np.arange(24, 32))


def test_colour_ops_match_numpy():
    x = _images(8, (5, 6, 7, 3)).astype(np.float64)
    u = np.random.default_rng(9).uniform(size=5)
    ub = u[:, None, None, None]
    want_b = x + (ub - 0.5) * 1.0
    m_pix = x.mean(axis=3, keepdims=True)
    want_s = (x - m_pix) * (ub * 2.0) + m_pix
    m_img = x.mean(axis=(1, 2, 3), keepdims=True)
    want_c = (x - m_img) * (ub + 0.5) + m_img
    xj, uj = jnp.asarray(x, jnp.float32), jnp.asarray(u, jnp.float32)
    np.testing.assert_allclose(A.brightness(xj, uj), want_b, atol=1e-5)
    np.testing.assert_allclose(A.saturation(xj, uj), want_s, atol=1e-5)
    np.testing.assert_allclose(A.contrast(xj, uj), want_c, atol=1e-5)
    # 'color' = brightness -> saturation -> contrast, each with its own draw.
    ub2, us2, uc2 = 0.9, 0.3, 0.1
    y = x + (ub2 - 0.5)
    y = (y - y.mean(3, keepdims=True)) * (us2 * 2.0) + y.mean(3, keepdims=True)
    y = (y - y.mean((1, 2, 3), keepdims=True)) * (uc2 + 0.5) + y.mean((1, 2, 3), keepdims=True)
    p = {"brightness": ub2, "saturation": us2, "contrast": uc2}
    np.testing.assert_allclose(A.apply_group("color", xj, p), y, atol=1e-5)


@pytest.mark.parametrize("hw", [(32, 32), (28, 28), (16, 24)])
def test_affine_sample_matches_numpy_grid_sample(hw):
    h, w = hw
    x = _images(10, (4, h, w, 3))
    rng = np.random.default_rng(11)
    thetas = np.stack(
        [
            np_rotation(0.2)[...],
            np_scaling(1.17, 0.86),
            np_rotation(-0.26) * 1.05,
            np.array([[0.9, 0.2, 0.15], [-0.1, 1.1, -0.3]]),  # shear + translation, off-image taps
        ]
    ) + rng.normal(scale=1e-3, size=(4, 2, 3))
    got = _affine(jnp.asarray(x), jnp.asarray(thetas, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), np_grid_sample(x, thetas), atol=1e-5)
    # Shared theta path ((2, 3) and (1, 2, 3)).
    t = jnp.asarray(thetas[3], jnp.float32)
    want = np_grid_sample(x, thetas[3])
    np.testing.assert_allclose(_affine(jnp.asarray(x), t), want, atol=1e-5)
    np.testing.assert_allclose(_affine(jnp.asarray(x), t[None]), want, atol=1e-5)


@pytest.mark.parametrize("hw", [(32, 32), (16, 24)])
def test_scale_and_rotate_match_numpy(hw):
    h, w = hw
    x = _images(12, (3, h, w, 3))
    rng = np.random.default_rng(13)
    sx = rng.uniform(1 / 1.2, 1.2, size=3).astype(np.float32)
    sy = rng.uniform(1 / 1.2, 1.2, size=3).astype(np.float32)
    ang = np.deg2rad(rng.uniform(-15, 15, size=3)).astype(np.float32)
    xj = jnp.asarray(x)
    np.testing.assert_allclose(_scale(xj, sx, sy), np_grid_sample(x, np_scaling(sx, sy)), atol=1e-5)
    np.testing.assert_allclose(_rotate(xj, ang), np_grid_sample(x, np_rotation(ang)), atol=1e-5)
    # Shared parameters.
    want = np_grid_sample(x, np_scaling(sx[0], sy[0]))
    np.testing.assert_allclose(_scale(xj, sx[0], sy[0]), want, atol=1e-5)
    want = np_grid_sample(x, np_rotation(ang[0]))
    np.testing.assert_allclose(_rotate(xj, ang[0]), want, atol=1e-5)


@pytest.mark.parametrize("shared", [True, False])
def test_affine_sample_gradient_is_the_transposed_resampling(shared):
    # The resampling is linear in x: build its matrix column by column with the NumPy
    # reference, and check that the JAX vector-Jacobian product applies the transpose.
    n, h, w, c = 2, 5, 7, 1
    theta = np.stack([np_rotation(0.3) * 1.1, np_scaling(0.9, 1.15)])
    theta = theta[:1] if shared else theta
    t = np.broadcast_to(theta, (n, 2, 3))
    basis = np.eye(h * w).reshape(h * w, h, w, 1)
    cols = [np_grid_sample(basis, t[b]).reshape(h * w, h * w).T for b in range(n)]  # (out, in)
    cot = _images(16, (n, h, w, c))
    x = _images(17, (n, h, w, c))
    theta_j = jnp.asarray(theta[0] if shared else theta, jnp.float32)
    pullback = jax.jit(lambda z, ct: jax.vjp(lambda y: A.affine_sample(y, theta_j), z)[1](ct)[0])
    g = pullback(jnp.asarray(x), jnp.asarray(cot))
    want = np.stack([(cols[b].T @ cot[b].reshape(-1)).reshape(h, w, c) for b in range(n)])
    np.testing.assert_allclose(np.asarray(g), want, atol=1e-5)


def test_identity_theta_and_rot90():
    x = _images(14, (3, 16, 24, 3))
    ident = np.array([[1.0, 0, 0], [0, 1.0, 0]], np.float32)
    np.testing.assert_allclose(_affine(jnp.asarray(x), ident), x, atol=1e-6)
    np.testing.assert_allclose(_affine(jnp.asarray(x), np.stack([ident] * 3)), x, atol=1e-6)
    np.testing.assert_allclose(_scale(jnp.asarray(x), 1.0, 1.0), x, atol=1e-6)
    np.testing.assert_allclose(_rotate(jnp.asarray(x), 0.0), x, atol=1e-6)
    # A quarter turn of a square image with half-pixel centres is an exact permutation.
    sq = _images(15, (2, 8, 8, 3))
    quarter = _rotate(jnp.asarray(sq), math.pi / 2)
    np.testing.assert_allclose(quarter, np.rot90(sq, 1, axes=(1, 2)), atol=1e-5)


# ------------------------------------------------------------------ random sampling


def test_sampled_parameter_ranges():
    keys = jax.random.split(jax.random.key(20), 3000)

    @jax.jit
    def draw_all(ks):
        out = {
            g: jax.vmap(lambda k, g=g: A.group_params(k, g, 7, (32, 32)))(ks) for g in SINGLE_GROUPS
        }
        out["cutout30"] = jax.vmap(lambda k: A.group_params(k, "cutout", 7, (30, 30)))(ks)
        return out

    drawn = draw_all(keys)
    draw = lambda group, hw=(32, 32): drawn[group if hw == (32, 32) else group + "30"]  # noqa: E731
    crop = draw("crop")
    assert set(np.unique(crop["tx"])) == set(range(-4, 5))
    assert set(np.unique(crop["ty"])) == set(range(-4, 5))
    assert np.bincount(np.asarray(crop["tx"]) + 4).min() > 250  # ~333 each: uniform
    cut = draw("cutout")
    assert set(np.unique(cut["ox"])) == set(range(0, 33))  # L = 16 (even): 0..32
    cut30 = draw("cutout", (30, 30))
    assert set(np.unique(cut30["oy"])) == set(range(0, 30))  # L = 15 (odd): 0..29
    sc = draw("scale")
    for v in (sc["sx"], sc["sy"]):
        assert v.min() >= 1 / 1.2 - 1e-6 and v.max() < 1.2 and v.min() < 0.85 and v.max() > 1.18
    assert abs(np.corrcoef(sc["sx"], sc["sy"])[0, 1]) < 0.1  # independent draws
    ang = np.rad2deg(np.asarray(draw("rotate")["angle"]))
    assert ang.min() >= -15.0 - 1e-4 and ang.max() < 15.0 and ang.min() < -14.5 and ang.max() > 14.5
    col = draw("color")
    for v in col.values():
        assert v.min() >= 0.0 and v.max() < 1.0
    assert abs(np.corrcoef(col["brightness"], col["contrast"])[0, 1]) < 0.1
    assert 0.45 < np.mean(draw("flip")["do_flip"]) < 0.55
    # Siamese draws are scalars; per-image draws have one value per image.
    chex.assert_shape(A.group_params(keys[0], "crop", 7, (32, 32))["tx"], ())
    chex.assert_shape(A.group_params(keys[0], "crop", 7, (32, 32), siamese=False)["tx"], (7,))


@pytest.mark.parametrize("siamese", [True, False])
def test_dsa_applies_the_sampled_parameters(siamese):
    x = jnp.asarray(_images(21, (4, 16, 16, 3)))
    keys = jax.random.split(jax.random.key(22), 3)
    ops = {
        "color": lambda p: A.contrast(
            A.saturation(A.brightness(x, p["brightness"]), p["saturation"]), p["contrast"]
        ),
        "crop": lambda p: A.translate(x, p["tx"], p["ty"]),
        "cutout": lambda p: A.cutout(x, p["ox"], p["oy"], 8),
        "flip": lambda p: A.flip(x, p["do_flip"]),
        "scale": lambda p: A.affine_sample(x, A.scale_theta(p["sx"], p["sy"])),
        "rotate": lambda p: A.affine_sample(x, A.rotate_theta(p["angle"])),
    }

    @jax.jit
    def both(k):
        got = {g: A.dsa(k, x, g, siamese=siamese) for g in ops}
        want = {g: op(A.group_params(k, g, 4, (16, 16), siamese=siamese)) for g, op in ops.items()}
        return got, want

    for key in keys:
        got, want = both(key)
        chex.assert_trees_all_close(got, want, atol=1e-5)


def test_group_choice_is_uniform_and_drives_dsa():
    keys = jax.random.split(jax.random.key(30), 1200)
    idx = np.asarray(jax.vmap(lambda k: A.select_group(k, A.DEFAULT_STRATEGY))(keys))
    counts = np.bincount(idx, minlength=6)
    assert counts.sum() == 1200 and len(counts) == 6
    assert counts.min() >= 150 and counts.max() <= 250, counts  # expected 200, sd ~13
    # dsa with the full strategy equals dsa restricted to the selected group.
    x = jnp.asarray(_images(31, (3, 16, 16, 3)))

    @jax.jit
    def outputs(k):
        return A.dsa(k, x), jnp.stack([A.dsa(k, x, g) for g in SINGLE_GROUPS])

    for i in range(12):
        full, singles = outputs(keys[i])
        chex.assert_trees_all_close(full, singles[idx[i]], atol=1e-6)
        # ... and differs from some other group's output (the check is not vacuous).
        assert any(not np.allclose(full, singles[j]) for j in range(6) if j != idx[i])
    assert len(set(idx[:12].tolist())) >= 4


# ---------------------------------------------------------------------- Siamese mode


@pytest.mark.parametrize("strategy", SINGLE_GROUPS)
def test_siamese_same_transform_for_every_batch(strategy):
    real = jnp.asarray(_images(40, (6, 16, 16, 3)))
    syn = jnp.asarray(_images(41, (3, 16, 16, 3)))
    const_in = jnp.broadcast_to(syn[:1], (6, 16, 16, 3))

    @jax.jit
    def run(k):
        f = lambda im: A.dsa(k, im, strategy)  # noqa: E731
        return f(jnp.concatenate([real, syn])), f(real), f(syn), f(real[3:]), f(const_in)

    for s in range(3):
        both, r, sy, r_tail, const = run(jax.random.key(100 + s))
        # Parameters do not depend on N, and every image shares them.
        chex.assert_trees_all_close(both[:6], r, atol=1e-6)
        chex.assert_trees_all_close(both[6:], sy, atol=1e-6)
        chex.assert_trees_all_close(r_tail, r[3:], atol=1e-6)
        chex.assert_trees_all_close(const, jnp.broadcast_to(const[:1], const.shape), atol=1e-6)


@pytest.mark.parametrize("strategy", SINGLE_GROUPS)
def test_per_image_mode_draws_independent_parameters(strategy):
    img = jnp.asarray(_images(50, (1, 16, 16, 3)))
    batch = jnp.broadcast_to(img, (8, 16, 16, 3))
    run = jax.jit(lambda k: (A.dsa(k, batch, strategy, siamese=False),
                             A.dsa(k, batch, strategy, siamese=True)))
    out, out_s = map(np.asarray, run(jax.random.key(51)))
    assert len({out[i].tobytes() for i in range(8)}) >= 2, strategy
    assert len({out_s[i].tobytes() for i in range(8)}) == 1


# ------------------------------------------------------------- jit, vmap, gradients


@pytest.mark.parametrize("siamese", [True, False])
def test_vmap_over_keys_equals_loop(siamese):
    keys = jax.random.split(jax.random.key(60), 6)
    xs = jnp.asarray(_images(61, (6, 4, 12, 12, 3)))
    got = jax.vmap(lambda k, x: A.dsa(k, x, siamese=siamese))(keys, xs)
    want = jnp.stack(
        [A.dsa(keys[i], xs[i], strategy=A.DEFAULT_STRATEGY, siamese=siamese) for i in range(6)]
    )
    chex.assert_trees_all_close(got, want, atol=1e-5)


def test_engine_pattern_vmap_over_classes_and_grad():
    classes = 4
    keys = jax.random.split(jax.random.key(70), classes)
    real = jnp.asarray(_images(71, (classes, 9, 12, 12, 3)))
    syn = jnp.asarray(_images(72, (classes, 3, 12, 12, 3)))
    # Make the first syn image of every class equal to the first real one.
    syn = syn.at[:, 0].set(real[:, 0])

    weights = jnp.asarray(_images(73, syn.shape))

    @jax.jit
    @functools.partial(jax.value_and_grad, has_aux=True)
    def loss(s):
        # The condensation engine's pattern: one key per class, shared by both batches.
        r_aug, s_aug = jax.vmap(lambda k, r, s: (A.dsa(k, r), A.dsa(k, s)))(keys, real, s)
        r_aug = jax.lax.stop_gradient(r_aug)
        value = jnp.sum((s_aug.mean(1) - r_aug.mean(1)) ** 2) + jnp.sum(s_aug * weights)
        return value, (r_aug, s_aug)

    (_, (ar, as_)), g = loss(syn)
    chex.assert_shape((ar, as_), (real.shape, syn.shape))
    chex.assert_trees_all_close(ar[:, 0], as_[:, 0], atol=1e-6)
    assert not np.allclose(ar[:, 0], real[:, 0])  # the keys did transform something
    assert bool(jnp.all(jnp.isfinite(g)))
    assert float(jnp.abs(g).sum()) > 0.0


@pytest.mark.parametrize("siamese", [True, False])
def test_gradients_finite_and_nonzero_for_every_group(siamese):
    x = jnp.asarray(_images(80, (3, 12, 12, 3)))
    w = jnp.asarray(_images(81, x.shape))
    @jax.jit
    def grads(im):
        return [
            jax.grad(lambda z, g=g: jnp.sum(A.dsa(jax.random.key(82), z, g, siamese) * w))(im)
            for g in SINGLE_GROUPS
        ]

    for strategy, g in zip(SINGLE_GROUPS, grads(x)):
        assert bool(jnp.all(jnp.isfinite(g))), strategy
        assert float(jnp.abs(g).sum()) > 0.0, strategy


def test_dtype_preserved_for_every_group():
    x = jnp.asarray(_images(90, (2, 8, 8, 3)), jnp.bfloat16)
    # Under vmap over keys the group index is batched, so every branch runs (and
    # lax.switch would reject branches whose output dtypes differ).
    keys = jax.random.split(jax.random.key(91), 4)
    y = jax.vmap(lambda k: A.dsa(k, x, siamese=False))(keys)
    assert y.dtype == jnp.bfloat16
    chex.assert_shape(y, (4,) + x.shape)
    assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))

    # Shared-parameter (Siamese) code paths of the ops, in one compilation.
    @jax.jit
    def shared(im):
        return [
            A.brightness(im, 0.3), A.saturation(im, 0.3), A.contrast(im, 0.3),
            A.translate(im, 1, -1), A.cutout(im, 2, 3, 4), A.flip(im, True),
            A.scale(im, 1.1, 0.9), A.rotate(im, 0.2),
        ]

    for out in shared(x):
        assert out.dtype == jnp.bfloat16


def test_repeated_calls_compile_once():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(k, im):
        return A.dsa(k, im)

    for s in range(4):
        f(jax.random.key(s), jnp.asarray(_images(s, (3, 8, 8, 3))))
    # The counter is live: a new shape means a second trace, which it rejects.
    with pytest.raises(AssertionError):
        f(jax.random.key(0), jnp.asarray(_images(0, (2, 8, 8, 3))))


_VARIANT_X = _images(100, (4, 12, 12, 3))
_VARIANT_KEYS = jax.random.split(jax.random.key(205), 3)  # scale, rotate, crop


@functools.lru_cache(maxsize=None)
def _op_by_op_reference(i):
    """dsa run primitive by primitive: dsa is jitted internally, so disable_jit is
    what makes this path truly un-jitted. Cached so both variants share it."""
    with jax.disable_jit():
        out = A.dsa(_VARIANT_KEYS[i], jnp.asarray(_VARIANT_X), strategy=A.DEFAULT_STRATEGY,
                    siamese=True)
    return np.asarray(out)


class DsaVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_equals_eager(self):
        groups = {int(A.select_group(k)) for k in _VARIANT_KEYS}
        assert len(groups) >= 3, groups  # the keys exercise several groups
        fn = self.variant(lambda k, im: A.dsa(k, im, strategy=A.DEFAULT_STRATEGY, siamese=True))
        for i, key in enumerate(_VARIANT_KEYS):
            got = fn(key, jnp.asarray(_VARIANT_X))
            chex.assert_trees_all_close(got, _op_by_op_reference(i), atol=1e-5)


def test_composite_group_runs_every_op_in_order_with_its_own_draw():
    """"color+crop+cutout" (IDC's and M3D's augmentation during condensation): brightness,
    saturation, contrast, an integer shift in [-4, 4] and a 16 x 16 cutout, every call; one
    draw per op from fold_in(parameter key, op index), shared by the batch (Siamese)."""
    assert A.parse_strategy("color+crop+cutout_flip") == ("color+crop+cutout", "flip")
    with pytest.raises(ValueError, match="Valid ops are"):
        A.parse_strategy("color+blur")
    x = _images(7, (3, 32, 32, 3))
    key = jax.random.key(11)
    got = np.asarray(A.dsa(key, jnp.asarray(x), "color+crop+cutout"))
    _, k_params = jax.random.split(key)
    u = [np.asarray(jax.random.uniform(jax.random.fold_in(k_params, i), (3,))) for i in range(3)]
    y = A.contrast(A.saturation(A.brightness(jnp.asarray(x), u[0][0]), u[0][1]), u[0][2])
    tx, ty = int(np.floor(u[1][0] * 9)) - 4, int(np.floor(u[1][1] * 9)) - 4
    y = A.translate(y, tx, ty, max_shift=4)
    ox, oy = int(np.floor(u[2][0] * 33)), int(np.floor(u[2][1] * 33))
    want = np.asarray(A.cutout(y, ox, oy, 16))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # Siamese: a larger batch gets the same transform on the images it shares.
    more = np.concatenate([x, _images(8, (5, 32, 32, 3))])
    np.testing.assert_allclose(np.asarray(A.dsa(key, jnp.asarray(more), "color+crop+cutout"))[:3],
                               got, rtol=0, atol=1e-5)
    looped = A.dsa(key, jnp.asarray(x), "color+crop+cutout", loop_over_keys=True)
    np.testing.assert_allclose(np.asarray(looped), got, rtol=0, atol=1e-6)
