"""Losses of IDM: distribution matching (linear-kernel MMD) and the class-aware regulariser.

See docs/FAITHFULNESS.md, "matching" and "class-aware CE". For one class the matching term is
the squared Euclidean distance between the mean embedding of a real batch and the mean embedding
of the (expanded, augmented) synthetic images, summed over feature dimensions. Real features are
constants: no gradient flows into them. The regulariser is a cross-entropy on the synthetic
logits, scaled by a weight that IDM sets to ``ce_weight * accuracy%`` of the feature extractor.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax


def _masked_mean(features: jnp.ndarray, mask: Optional[jnp.ndarray]) -> jnp.ndarray:
    if mask is None:
        return jnp.mean(features, axis=0)
    weights = mask.astype(features.dtype)
    return weights @ features / jnp.maximum(jnp.sum(weights), 1.0)


def mmd(real_features: jnp.ndarray, syn_features: jnp.ndarray,
        real_mask: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Linear-kernel MMD of DM/IDM: ``sum_d (mean_i real[i,d] - mean_j syn[j,d])**2``.

    Args:
      real_features: (Nr, D) embeddings of real images; treated as constants.
      syn_features: (Ns, D) embeddings of synthetic images.
      real_mask: optional (Nr,) bool/0-1 array; rows with 0 are padding and are left out of the
        real mean (used when a class has fewer real images than the static batch size).

    Returns:
      scalar float, in squared feature units (a sum over D, not a mean).
    """
    real_mean = jax.lax.stop_gradient(_masked_mean(real_features, real_mask))
    syn_mean = jnp.mean(syn_features, axis=0)
    return jnp.sum(jnp.square(real_mean - syn_mean))


def class_mmd(real_features: jnp.ndarray, syn_features: jnp.ndarray,
              real_mask: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """``mmd`` for every class at once: (K, Nr, D), (K, Ns, D) [, (K, Nr)] -> (K,)."""
    if real_mask is None:
        return jax.vmap(mmd)(real_features, syn_features)
    return jax.vmap(mmd)(real_features, syn_features, real_mask)


def class_aware_ce(logits: jnp.ndarray, labels: jnp.ndarray, weight) -> jnp.ndarray:
    """IDM's class-aware regulariser: ``weight * mean cross-entropy(logits, labels)``.

    Args:
      logits: (N, K) synthetic logits.
      labels: (N,) integer class labels.
      weight: scalar (may be traced); IDM passes ``ce_weight * accuracy`` with the extractor's
        running training accuracy in percent (0..100), and 0 when its meter is empty. It is a
        constant for differentiation.

    Returns:
      scalar float.
    """
    weight = jax.lax.stop_gradient(jnp.asarray(weight, logits.dtype))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return weight * jnp.mean(ce)


# --------------------------------------------------------------------------- beyond IDM
# Options of the matching objective (idm_jax.matching.make_objective); the faithful default is
# ``mmd`` above. Each takes one class's real features (Nr, D) with an optional mask and its
# synthetic features (Ns, D), and treats the real features as constants.

def _weights(n: int, mask: Optional[jnp.ndarray], dtype) -> jnp.ndarray:
    return jnp.ones((n,), dtype) if mask is None else mask.astype(dtype)


def _squared_distances(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """(Na, D), (Nb, D) -> (Na, Nb) squared Euclidean distances (clamped at 0)."""
    d2 = (jnp.sum(a * a, axis=1)[:, None] + jnp.sum(b * b, axis=1)[None, :] - 2.0 * a @ b.T)
    return jnp.maximum(d2, 0.0)


def _kernel_mean(d2, wa, wb, bandwidths, exclude_diagonal: bool):
    """Weighted mean of the multi-bandwidth Gaussian kernel over pairs; the diagonal left out
    (an unbiased within-set term) when ``exclude_diagonal``."""
    k = sum(jnp.exp(-d2 / (2.0 * jnp.square(bw))) for bw in bandwidths)
    pair = wa[:, None] * wb[None, :]
    if exclude_diagonal:
        pair = pair * (1.0 - jnp.eye(d2.shape[0], dtype=d2.dtype))
    return jnp.sum(pair * k) / jnp.maximum(jnp.sum(pair), 1e-12)


def median_bandwidth(real_features, syn_features, real_mask=None) -> jnp.ndarray:
    """The median heuristic: sigma with 2 sigma^2 = median squared real-synthetic distance
    (valid real rows only), a constant for differentiation."""
    d2 = _squared_distances(jax.lax.stop_gradient(real_features),
                            jax.lax.stop_gradient(syn_features))
    if real_mask is not None:
        d2 = jnp.where(real_mask[:, None], d2, jnp.nan)
    return jnp.sqrt(jnp.maximum(jnp.nanmedian(d2), 1e-12) / 2.0)


def gaussian_mmd(real_features, syn_features, real_mask=None, bandwidths=None,
                 unbiased: bool = False, real_term: bool = True) -> jnp.ndarray:
    """Squared MMD with a sum of Gaussian kernels ``k(x, y) = sum_s exp(-|x-y|^2 / (2 s^2))``.

    ``E k(r, r') + E k(s, s') - 2 E k(r, s)`` over the real and synthetic features (the kind of
    distance M3D uses; its bandwidth rule and kernels differ: docs/METHODS.md). Biased
    (V-statistic) by default; ``unbiased`` leaves the diagonal out of the two within-set terms.
    ``bandwidths``: a sequence of sigmas in feature units; None takes one from the median
    heuristic (``median_bandwidth``). The real-real term carries no gradient; it is
    kept so that the value is the MMD^2 itself (``real_term=False`` drops it and its Nr^2
    kernel evaluations; the gradient is unchanged).

    Returns a scalar in kernel units (0 for identical sets in the biased form).
    """
    real = jax.lax.stop_gradient(real_features)
    wr = _weights(real.shape[0], real_mask, real.dtype)
    ws = _weights(syn_features.shape[0], None, syn_features.dtype)
    if bandwidths is None:
        bandwidths = (median_bandwidth(real, syn_features, real_mask),)
    value = (_kernel_mean(_squared_distances(syn_features, syn_features), ws, ws, bandwidths,
                          unbiased)
             - 2.0 * _kernel_mean(_squared_distances(real, syn_features), wr, ws, bandwidths,
                                  False))
    if real_term:
        value = value + _kernel_mean(_squared_distances(real, real), wr, wr, bandwidths, unbiased)
    return value


def characteristic_distance(real_features, syn_features, real_mask=None, *, key,
                            num_frequencies: int = 1024, scale: float = 1.0) -> jnp.ndarray:
    """Mean squared gap of the empirical characteristic functions at random frequencies.

    ``mean_w |phi_real(w) - phi_syn(w)|^2`` with ``phi(w) = mean_j exp(i w . x_j)`` and
    ``num_frequencies`` frequencies ``w ~ N(0, (scale^2 / D) I)`` drawn from ``key`` (so that
    ``w . x`` has variance ``scale^2`` times the mean squared feature): the MMD of random
    Fourier features. NCFM's loss is another one (normalised features, unscaled frequencies, a
    modulus rather than a square; docs/METHODS.md).

    Returns a scalar in [0, 4].
    """
    real = jax.lax.stop_gradient(real_features)
    dim = real.shape[1]
    freqs = jax.random.normal(key, (num_frequencies, dim), real.dtype) * (scale / dim ** 0.5)
    cos_r, sin_r = _empirical_cf(real, _weights(real.shape[0], real_mask, real.dtype), freqs)
    cos_s, sin_s = _empirical_cf(syn_features, _weights(syn_features.shape[0], None, real.dtype),
                                 freqs)
    return jnp.mean(jnp.square(cos_r - cos_s) + jnp.square(sin_r - sin_s))


def _empirical_cf(features, weights, freqs):
    """Real and imaginary parts (F,) of the weighted empirical characteristic function of the
    rows of ``features`` (N, D) at the frequencies ``freqs`` (F, D)."""
    angles = features @ freqs.T                                 # (N, F)
    total = jnp.maximum(jnp.sum(weights), 1.0)
    return weights @ jnp.cos(angles) / total, weights @ jnp.sin(angles) / total


# M3D's kernel: exp(-d^2 / (m b)) summed over these multipliers of its bandwidth b.
M3D_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)


def m3d_mmd(real_features, syn_features, real_mask=None,
            multipliers=M3D_MULTIPLIERS) -> jnp.ndarray:
    """M3D's loss: the biased squared MMD with ``k = sum_m exp(-d^2 / (m b))``.

    ``b`` is the mean off-diagonal squared distance over the synthetic and the (valid) real
    features stacked together, recomputed on every call and a constant for differentiation;
    the estimate is ``mean K_ss - 2 mean K_sr + mean K_rr``, diagonals included
    (docs/METHODS.md, "M3D"). Real features (Nr, D) carry no gradient; syn (Ns, D).
    """
    real = jax.lax.stop_gradient(real_features)
    ns = syn_features.shape[0]
    z = jnp.concatenate([syn_features, real.astype(syn_features.dtype)])
    w = jnp.concatenate([jnp.ones((ns,), z.dtype), _weights(real.shape[0], real_mask, z.dtype)])
    d2 = _squared_distances(z, z)
    pair = w[:, None] * w[None, :]
    count = jnp.sum(w)
    b = jax.lax.stop_gradient(jnp.sum(pair * d2) / (count * count - count))
    k = sum(jnp.exp(-d2 / (b * m)) for m in multipliers) * pair

    def block_mean(rows, cols):
        return jnp.sum(k[rows, cols]) / (jnp.sum(w[rows]) * jnp.sum(w[cols]))

    syn_rows, real_rows = slice(0, ns), slice(ns, None)
    return (block_mean(syn_rows, syn_rows) - 2.0 * block_mean(syn_rows, real_rows)
            + block_mean(real_rows, real_rows))


def l2_normalize(features, eps: float = 1e-12):
    """Rows scaled to unit norm, as PyTorch's ``F.normalize`` (divides by max(norm, eps))."""
    norm = jnp.sqrt(jnp.sum(jnp.square(features), axis=-1, keepdims=True))
    return features / jnp.maximum(norm, eps)


def ncfm_distance(real_features, syn_features, real_mask=None, *, key,
                  num_frequencies: int = 4096, alpha: float = 0.5, beta: float = 0.5,
                  scale: float = 300.0) -> jnp.ndarray:
    """NCFM's loss: the characteristic-function discrepancy of L2-normalised features.

    Both sides are normalised to unit norm; ``num_frequencies`` frequencies t ~ N(0, I) (D-dim,
    not scaled) are drawn from ``key`` and shared by the two sides. With Φ the empirical
    characteristic function at t, the value is ``scale * mean_t sqrt(alpha * amp + beta *
    phase)`` with ``amp = (|Φ_r| - |Φ_s|)^2`` and ``phase = max(2 (|Φ_r||Φ_s| - Re Φ_r Re Φ_s
    - Im Φ_r Im Φ_s), 1e-12)``: a modulus, not a square (docs/METHODS.md, "NCFM"). Real features
    (Nr, D) carry no gradient; syn (Ns, D).
    """
    real = l2_normalize(jax.lax.stop_gradient(real_features))
    syn = l2_normalize(syn_features)
    freqs = jax.random.normal(key, (num_frequencies, real.shape[1]), real.dtype)
    re_r, im_r = _empirical_cf(real, _weights(real.shape[0], real_mask, real.dtype), freqs)
    re_s, im_s = _empirical_cf(syn, _weights(syn.shape[0], None, real.dtype), freqs)
    norm_r, norm_s = jnp.sqrt(re_r ** 2 + im_r ** 2), jnp.sqrt(re_s ** 2 + im_s ** 2)
    amp = jnp.square(norm_r - norm_s)
    phase = jnp.maximum(2.0 * (norm_r * norm_s - re_r * re_s - im_r * im_s), 1e-12)
    return scale * jnp.mean(jnp.sqrt(alpha * amp + beta * phase))


def _centred(features, weights):
    mean = weights @ features / jnp.maximum(jnp.sum(weights), 1.0)
    return (features - mean) * weights[:, None]


def covariance_gap(real_features, syn_features, real_mask=None) -> jnp.ndarray:
    """``|C_real - C_syn|_F^2`` of the (biased) D x D feature covariances (IID's covariance term is
    per channel and spatial position instead: docs/METHODS.md).

    Computed from Gram matrices, ``|C_a|^2 = |A A^T|^2 / n_a^2`` and
    ``tr(C_a C_b) = |A B^T|^2 / (n_a n_b)`` with centred rows A, B, so no D x D matrix is
    formed. Real features are constants.
    """
    real = jax.lax.stop_gradient(real_features)
    wr = _weights(real.shape[0], real_mask, real.dtype)
    ws = _weights(syn_features.shape[0], None, real.dtype)
    a, b = _centred(real, wr), _centred(syn_features, ws)
    na, nb = jnp.maximum(jnp.sum(wr), 1.0), jnp.maximum(jnp.sum(ws), 1.0)
    frob = lambda m: jnp.sum(jnp.square(m))
    return frob(a @ a.T) / na ** 2 + frob(b @ b.T) / nb ** 2 - 2.0 * frob(a @ b.T) / (na * nb)


def position_covariance_gap(real_features, syn_features, real_mask=None, *,
                            channels: int) -> jnp.ndarray:
    """IID's covariance term (before its weight 0.03): ``|C_real - C_syn|_F^2`` where C is the
    ``channels x channels`` covariance of the channels over the class's samples, computed at
    each spatial position (centred by the per-position sample mean, divided by N) and summed
    over the positions.

    The features are the flattened NHWC output of the network's last block, (N, P * channels)
    with position-major layout (P = H * W positions); the synthetic mean is not detached, the
    real features carry no gradient. (docs/METHODS.md, "IID".)
    """
    real = jax.lax.stop_gradient(real_features)

    def covariance(features, weights):
        x = features.reshape(features.shape[0], -1, channels)          # (N, P, C)
        n = jnp.maximum(jnp.sum(weights), 1.0)
        mean = jnp.einsum("n,npc->pc", weights, x) / n
        centred = (x - mean) * weights[:, None, None]
        return jnp.einsum("npc,npd->cd", centred, centred) / n          # summed over P

    gap = (covariance(real, _weights(real.shape[0], real_mask, real.dtype))
           - covariance(syn_features, _weights(syn_features.shape[0], None, real.dtype)))
    return jnp.sum(jnp.square(gap))


def variance_gap(real_features, syn_features, real_mask=None) -> jnp.ndarray:
    """``sum_d (var_real[d] - var_syn[d])^2`` of the per-feature (biased) variances."""
    real = jax.lax.stop_gradient(real_features)
    wr = _weights(real.shape[0], real_mask, real.dtype)
    ws = _weights(syn_features.shape[0], None, real.dtype)
    var = lambda x, w: jnp.sum(jnp.square(_centred(x, w)), axis=0) / jnp.maximum(jnp.sum(w), 1.0)
    return jnp.sum(jnp.square(var(real, wr) - var(syn_features, ws)))


__all__ = ["mmd", "class_mmd", "class_aware_ce", "median_bandwidth", "gaussian_mmd",
           "M3D_MULTIPLIERS", "m3d_mmd", "l2_normalize", "ncfm_distance",
           "characteristic_distance", "covariance_gap", "position_covariance_gap",
           "variance_gap"]
