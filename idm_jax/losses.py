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


__all__ = ["mmd", "class_mmd", "class_aware_ce"]
