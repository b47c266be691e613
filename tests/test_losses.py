"""mmd, class_mmd and class_aware_ce against NumPy formulas and known invariants."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

import idm_jax


def numpy_mmd(real, syn):
    return float(np.sum((real.mean(axis=0) - syn.mean(axis=0)) ** 2))


def numpy_ce(logits, labels):
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(labels)), labels].mean())


class MMDTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_equals_numpy_formula(self):
        rng = np.random.default_rng(0)
        for nr, ns, d in [(7, 3, 5), (256, 40, 2048), (1, 1, 1)]:
            real = rng.normal(size=(nr, d)).astype(np.float32)
            syn = rng.normal(size=(ns, d)).astype(np.float32)
            got = float(self.variant(idm_jax.mmd)(real, syn))
            np.testing.assert_allclose(got, numpy_mmd(real, syn), rtol=1e-4)

    def test_zero_for_identical_batches(self):
        x = jax.random.normal(jax.random.PRNGKey(0), (16, 32))
        np.testing.assert_allclose(float(idm_jax.mmd(x, x)), 0.0, atol=1e-10)
        # Only the means matter: a permuted copy matches too.
        np.testing.assert_allclose(float(idm_jax.mmd(x, x[::-1])), 0.0, atol=1e-10)

    def test_no_gradient_into_real_features(self):
        real = jax.random.normal(jax.random.PRNGKey(1), (8, 6))
        syn = jax.random.normal(jax.random.PRNGKey(2), (4, 6))
        g_real, g_syn = jax.grad(idm_jax.mmd, argnums=(0, 1))(real, syn)
        np.testing.assert_array_equal(np.asarray(g_real), 0.0)
        # d/dsyn_j = -2/Ns (mean_r - mean_s), the same for every synthetic row.
        want = -2.0 / 4 * (np.asarray(real).mean(0) - np.asarray(syn).mean(0))
        np.testing.assert_allclose(np.asarray(g_syn), np.tile(want, (4, 1)), rtol=1e-5)

    def test_mask_drops_padding_rows(self):
        rng = np.random.default_rng(3)
        real = rng.normal(size=(10, 4)).astype(np.float32)
        syn = rng.normal(size=(3, 4)).astype(np.float32)
        padded = np.concatenate([real, 1e3 * np.ones((6, 4), np.float32)])
        mask = np.arange(16) < 10
        np.testing.assert_allclose(float(idm_jax.mmd(padded, syn, mask)), numpy_mmd(real, syn),
                                   rtol=1e-4)

    def test_class_mmd_equals_loop(self):
        rng = np.random.default_rng(4)
        real = rng.normal(size=(5, 9, 7)).astype(np.float32)
        syn = rng.normal(size=(5, 4, 7)).astype(np.float32)
        got = np.asarray(jax.jit(idm_jax.class_mmd)(real, syn))
        want = [numpy_mmd(real[k], syn[k]) for k in range(5)]
        chex.assert_shape(got, (5,))
        np.testing.assert_allclose(got, want, rtol=1e-4)
        mask = rng.random((5, 9)) < 0.7
        mask[:, 0] = True
        got = np.asarray(idm_jax.class_mmd(real, syn, mask))
        want = [numpy_mmd(real[k][mask[k]], syn[k]) for k in range(5)]
        np.testing.assert_allclose(got, want, rtol=1e-4)


class ClassAwareCETest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_equals_weighted_numpy_ce(self):
        rng = np.random.default_rng(5)
        logits = rng.normal(size=(12, 10)).astype(np.float32) * 3
        labels = rng.integers(0, 10, size=12)
        for weight in [0.0, 0.5, 0.5 * 62.5]:
            got = float(self.variant(idm_jax.class_aware_ce)(logits, labels, weight))
            np.testing.assert_allclose(got, weight * numpy_ce(logits, labels), rtol=1e-5)

    def test_weight_is_traced_and_constant_for_gradients(self):
        logits = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
        labels = jnp.array([0, 1, 2, 0])
        fn = jax.jit(chex.assert_max_traces(idm_jax.class_aware_ce, n=1))
        values = [float(fn(logits, labels, jnp.float32(w))) for w in (1.0, 2.0, 3.0)]
        np.testing.assert_allclose(values[1], 2 * values[0], rtol=1e-6)
        g_weight = jax.grad(idm_jax.class_aware_ce, argnums=2)(logits, labels, 2.0)
        assert float(g_weight) == 0.0
