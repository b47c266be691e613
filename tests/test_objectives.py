"""The matching objectives beyond IDM against NumPy formulas, and their wiring into the engine."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idm_jax import config as config_lib
from idm_jax import engine as engine_lib
from idm_jax import losses, matching
from idm_jax import real as real_lib
from idm_jax import presets


def features(seed, n, d=6, shift=0.0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)) + shift).astype(np.float32)


def np_gaussian_mmd(real, syn, sigmas, unbiased=False):
    def k(a, b):
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return sum(np.exp(-d2 / (2 * s * s)) for s in sigmas)

    def within(a):
        m = k(a, a)
        if unbiased:
            n = len(a)
            return (m.sum() - np.trace(m)) / (n * (n - 1))
        return m.mean()

    return within(real) + within(syn) - 2 * k(real, syn).mean()


@pytest.mark.parametrize("unbiased", [False, True])
def test_gaussian_mmd_equals_the_numpy_formula(unbiased):
    real, syn = features(0, 9), features(1, 5, shift=0.7)
    got = losses.gaussian_mmd(real, syn, bandwidths=(0.5, 1.0, 3.0), unbiased=unbiased)
    np.testing.assert_allclose(got, np_gaussian_mmd(real, syn, (0.5, 1.0, 3.0), unbiased),
                               rtol=1e-4, atol=1e-6)


def test_gaussian_mmd_mask_drops_real_rows_and_identical_sets_give_zero():
    real, syn = features(2, 8), features(3, 4, shift=0.3)
    mask = np.array([1, 1, 0, 1, 0, 1, 1, 1], bool)
    got = losses.gaussian_mmd(real, syn, mask, bandwidths=(1.5,))
    np.testing.assert_allclose(got, np_gaussian_mmd(real[mask], syn, (1.5,)), rtol=1e-4)
    np.testing.assert_allclose(losses.gaussian_mmd(syn, syn, bandwidths=(1.0, 2.0)), 0.0,
                               atol=1e-5)
    # Dropping the constant real-real term changes the value, not the gradient.
    grad = lambda term: jax.grad(lambda s: losses.gaussian_mmd(real, s, bandwidths=(1.5,),
                                                               real_term=term))(syn)
    np.testing.assert_allclose(grad(False), grad(True), rtol=1e-5, atol=1e-7)


def np_m3d_mmd(real, syn, bandwidth=None):
    """M3D's loss as its code writes it (float64): cdist² over [syn; real], b = sum / (N² - N),
    a sum of exp(-d² / (b m)), XX - 2 XY + YY with X the synthetic features."""
    z = np.concatenate([syn, real]).astype(np.float64)
    d2 = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    n = len(z)
    b = d2.sum() / (n * n - n) if bandwidth is None else bandwidth
    k = sum(np.exp(-d2 / (b * m)) for m in (0.25, 0.5, 1.0, 2.0, 4.0))
    s = len(syn)
    return k[:s, :s].mean() - 2 * k[:s, s:].mean() + k[s:, s:].mean(), b


def np_ncfm(real, syn, t):
    """NCFM's CFLossFunc after F.normalize, transcribed in float64, times 300."""
    real = real / np.maximum(np.linalg.norm(real, axis=1, keepdims=True), 1e-12)
    syn = syn / np.maximum(np.linalg.norm(syn, axis=1, keepdims=True), 1e-12)

    def cf(x):
        angles = t @ x.T                                       # (F, N)
        re, im = np.cos(angles).mean(1), np.sin(angles).mean(1)
        return re, im, np.sqrt(re * re + im * im)

    re_s, im_s, n_s = cf(syn)
    re_r, im_r, n_r = cf(real)
    amp = (n_r - n_s) ** 2
    pha = np.maximum(2 * (n_r * n_s - re_s * re_r - im_s * im_r), 1e-12)
    return 300 * np.mean(np.sqrt(0.5 * amp + 0.5 * pha))


def test_ncfm_distance_equals_its_code_in_value_and_gradient():
    real, syn = features(20, 9, d=5), features(21, 4, d=5, shift=0.5)
    key = jax.random.PRNGKey(3)
    t = np.asarray(jax.random.normal(key, (64, 5)), np.float64)   # the frequencies it draws
    value = lambda s: losses.ncfm_distance(real, s, key=key, num_frequencies=64)
    np.testing.assert_allclose(value(syn), np_ncfm(real.astype(np.float64), syn, t), rtol=1e-4)
    grad = np.asarray(jax.grad(value)(syn))
    numeric = np.zeros_like(grad, np.float64)
    eps = 1e-5
    for i in range(syn.shape[0]):
        for j in range(syn.shape[1]):
            up, down = syn.astype(np.float64), syn.astype(np.float64)
            up[i, j] += eps
            down[i, j] -= eps
            numeric[i, j] = (np_ncfm(real.astype(np.float64), up, t)
                             - np_ncfm(real.astype(np.float64), down, t)) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=2e-3, atol=2e-3)
    # Unit norm: scaling the features changes nothing; a mask drops real rows.
    np.testing.assert_allclose(losses.ncfm_distance(3.0 * real, 0.5 * syn, key=key,
                                                    num_frequencies=64), value(syn), rtol=1e-5)
    mask = np.arange(9) < 6
    np.testing.assert_allclose(
        losses.ncfm_distance(real, syn, mask, key=key, num_frequencies=64),
        np_ncfm(real[:6].astype(np.float64), syn, t), rtol=1e-4)


def np_iid_covariance(real, syn, channels):
    """IID's L_CM as its code writes it (float64): features [N, C, P]; per-(c, p) mean over N;
    matmul of the centred [N, C, P] with its transpose -> [N, C, C]; mean over N."""
    def cov(f):
        x = f.reshape(len(f), -1, channels).transpose(0, 2, 1).astype(np.float64)   # [N, C, P]
        sub = x - x.mean(0, keepdims=True)
        return (sub @ sub.transpose(0, 2, 1)).mean(0)
    return ((cov(real) - cov(syn)) ** 2).sum()


def test_iid_position_covariance_equals_its_code_in_value_and_gradient():
    real, syn = features(30, 7, d=12), features(31, 4, d=12, shift=0.4)   # 4 positions x 3
    value = lambda s: losses.position_covariance_gap(real, s, channels=3)
    np.testing.assert_allclose(value(syn), np_iid_covariance(real, syn, 3), rtol=1e-4)
    grad = np.asarray(jax.grad(value)(syn))
    numeric = np.zeros_like(grad, np.float64)
    for i in range(4):
        for j in range(12):
            up, down = syn.astype(np.float64), syn.astype(np.float64)
            up[i, j] += 1e-5
            down[i, j] -= 1e-5
            numeric[i, j] = (np_iid_covariance(real, up, 3)
                             - np_iid_covariance(real, down, 3)) / 2e-5
    np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-4)
    mask = np.arange(7) < 5
    np.testing.assert_allclose(losses.position_covariance_gap(real, syn, mask, channels=3),
                               np_iid_covariance(real[:5], syn, 3), rtol=1e-4)


def test_m3d_mmd_equals_its_code_in_value_and_gradient():
    real, syn = features(10, 7), features(11, 4, shift=0.6)
    want, b = np_m3d_mmd(real, syn)
    np.testing.assert_allclose(losses.m3d_mmd(real, syn), want, rtol=1e-4, atol=1e-6)
    # The gradient holds b fixed (the code detaches it): central differences of the NumPy form.
    grad = np.asarray(jax.grad(lambda s: losses.m3d_mmd(real, s))(syn))
    numeric = np.zeros_like(grad, np.float64)
    eps = 1e-4
    for i in range(syn.shape[0]):
        for j in range(syn.shape[1]):
            up, down = syn.astype(np.float64).copy(), syn.astype(np.float64).copy()
            up[i, j] += eps
            down[i, j] -= eps
            numeric[i, j] = (np_m3d_mmd(real, up, b)[0] - np_m3d_mmd(real, down, b)[0]) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=2e-3, atol=1e-5)
    # Masked real rows take no part, in the bandwidth either.
    mask = np.array([1, 1, 0, 1, 1, 0, 1], bool)
    np.testing.assert_allclose(losses.m3d_mmd(real, syn, mask), np_m3d_mmd(real[mask], syn)[0],
                               rtol=1e-4, atol=1e-6)


def test_median_heuristic_and_no_gradient_into_real():
    real, syn = features(4, 7), features(5, 3, shift=1.0)
    d2 = ((real[:, None] - syn[None]) ** 2).sum(-1)
    sigma = np.sqrt(np.median(d2) / 2)
    np.testing.assert_allclose(losses.median_bandwidth(real, syn), sigma, rtol=1e-5)
    np.testing.assert_allclose(losses.gaussian_mmd(real, syn),
                               np_gaussian_mmd(real, syn, (sigma,)), rtol=1e-4)
    g = jax.grad(lambda r: losses.gaussian_mmd(r, syn))(jnp.asarray(real))
    np.testing.assert_array_equal(g, 0.0)


def test_characteristic_distance_equals_complex_exponentials_at_its_frequencies():
    real, syn = features(6, 10), features(7, 4, shift=0.5)
    mask = np.array([1] * 8 + [0] * 2, bool)
    key, f, scale = jax.random.PRNGKey(3), 64, 2.0
    got = losses.characteristic_distance(real, syn, mask, key=key, num_frequencies=f,
                                         scale=scale)
    # The documented draw: w ~ N(0, scale^2 / D), F rows.
    w = np.asarray(jax.random.normal(key, (f, real.shape[1]))) * scale / np.sqrt(real.shape[1])
    phi = lambda x: np.exp(1j * x @ w.T).mean(axis=0)
    want = np.mean(np.abs(phi(real[mask]) - phi(syn)) ** 2)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


def test_characteristic_distance_approaches_the_gaussian_mmd_of_its_kernel():
    # Random Fourier features: over many frequencies w ~ N(0, s^2/D I), the mean squared gap of
    # the characteristic functions is the biased Gaussian-kernel MMD^2 with sigma = sqrt(D)/s.
    real, syn = features(8, 12, d=4), features(9, 6, d=4, shift=0.8)
    scale = 1.5
    got = losses.characteristic_distance(real, syn, key=jax.random.PRNGKey(0),
                                         num_frequencies=200_000, scale=scale)
    want = np_gaussian_mmd(real, syn, (np.sqrt(4) / scale,))
    np.testing.assert_allclose(got, want, rtol=0.03)


def test_covariance_and_variance_gaps_equal_numpy():
    real, syn = features(10, 9, d=5), features(11, 4, d=5, shift=0.2) * 1.7
    mask = np.array([1, 0, 1, 1, 1, 0, 1, 1, 1], bool)
    cov = lambda x: np.cov(x, rowvar=False, bias=True)
    np.testing.assert_allclose(losses.covariance_gap(real, syn, mask),
                               ((cov(real[mask]) - cov(syn)) ** 2).sum(), rtol=1e-4)
    np.testing.assert_allclose(losses.variance_gap(real, syn, mask),
                               ((real[mask].var(0) - syn.var(0)) ** 2).sum(), rtol=1e-4)
    np.testing.assert_allclose(losses.covariance_gap(syn, syn), 0.0, atol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    ({"distance": "cosine"}, "unknown distance"),
    ({"mmd_bandwidths": "1,-2"}, "finite and > 0"),
    ({"mmd_bandwidths": "1,x"}, "comma-separated"),
    ({"cf_scale": 0.0}, "cf_scale"),
    ({"cf_frequencies": 0}, "cf_frequencies"),
    ({"moment": "kurtosis"}, "unknown moment"),
    ({"moment_weight": float("inf")}, "moment_weight"),
    ({"match_weight": -1.0}, "match_weight"),
])
def test_objective_settings_are_validated(overrides, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(config_lib.Config(), **overrides)


def test_faithful_presets_keep_the_linear_objective():
    for name in ("cifar10-ipc1", "cifar10-ipc10", "cifar10-ipc50", "digits-ipc10"):
        config = presets.get_preset(name)
        assert config.distance == "linear" and config.moment_weight == 0.0
        objective = matching.make_objective(config)
        assert objective.keywords["distance"] is matching.linear_distance
        assert objective.keywords["moment"] is None


def test_match_weight_zero_leaves_the_ce_term_alone_and_still_reports_the_distance():
    rng = np.random.default_rng(7)
    real, syn = features(8, 9), features(9, 4, shift=0.5)
    logits = rng.normal(size=(4, 3)).astype(np.float32)
    mask, key = np.ones(9, bool), jax.random.PRNGKey(0)

    def objective(weight, s):
        return matching.idm_objective(real, mask, s, logits, 2, 0.7, key, match_weight=weight)

    loss, terms = objective(0.0, syn)
    # CE by hand: mean over the rows of -log softmax at the label, scaled by ce_scale.
    shifted = logits - logits.max(-1, keepdims=True)
    ce = float(np.mean(np.log(np.exp(shifted).sum(-1)) - shifted[:, 2]))
    np.testing.assert_allclose(loss, 0.7 * ce, rtol=1e-5)
    np.testing.assert_allclose(terms["mmd"], np.sum((real.mean(0) - syn.mean(0)) ** 2),
                               rtol=1e-5)
    # No gradient reaches the features through the distance; weight 1 is IDM's objective.
    assert not np.any(jax.grad(lambda s: objective(0.0, s)[0])(syn))
    np.testing.assert_array_equal(objective(1.0, syn)[0], matching.idm_objective(
        real, mask, syn, logits, 2, 0.7, key)[0])
    np.testing.assert_allclose(objective(2.0, syn)[0], 2 * terms["mmd"] + 0.7 * ce, rtol=1e-5)


@pytest.mark.parametrize("overrides", [
    {"distance": "gaussian"}, {"distance": "gaussian", "mmd_bandwidths": "1,4"},
    {"distance": "characteristic", "cf_frequencies": 32},
    {"moment_weight": 0.1}, {"moment_weight": 0.1, "moment": "variance"},
])
def test_each_objective_runs_in_the_engine_and_lowers_its_loss(overrides):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 10)
    images = (rng.integers(0, 120, (30, 8, 8, 3)) + 60 * labels[:, None, None, None]).astype(
        np.uint8)
    config = config_lib.Config(dataset="cifar10", ipc=2, model="ConvNetW32", batch_real=10,
                               trained_bs=8, model_train_steps=0, net_num=1, initial_models=1,
                               fetch_net_num=1,
                               net_push_num=0, dsa_strategy="none", syn_ce=False,
                               real_sampling="first", lr_img=0.1, eval_every=0, **overrides)
    real = real_lib.prepare_real(images, labels, (0.5,) * 3, (0.25,) * 3)
    engine = engine_lib.make_engine(config, 3, real.image_shape)
    state = engine_lib.init_state(engine, real, 0)
    step = engine_lib.make_step(engine, real)
    history = []
    for _ in range(4):
        state, metrics = step(state, real)
        history.append({k: float(v) for k, v in metrics.items()})
    assert all(np.isfinite(h["loss"]) for h in history)
    assert ("moment" in history[0]) == (config.moment_weight > 0)
    if config.distance != "characteristic":     # fresh frequencies each pass: not monotone
        assert history[-1]["loss"] < history[0]["loss"], history
