"""IID on IDM, "Exploiting Inter-sample and Inter-feature Relations in Dataset Distillation"
(Deng et al., CVPR 2024), as ``IDM+ours/IDM_cifar10_IID.py`` runs it (VincenDen/IID
``f0d4b30``; docs/METHODS.md, "IID").

IID changes nothing of IDM's loop but each class's loss, which gains two terms with weights
written in the code:

- **covariance, 0.03**: ``losses.position_covariance_gap`` of the extractor's last-block
  features, the channels x channels covariance at each of the spatial positions, summed over
  them (128 x 128 over 16 positions for ConvNet-3 on 32 x 32);
- **within-class scatter, 0.01**: the sum over the class's synthetic views of the squared
  distance of their embedding under a frozen pretrained ResNet-18 to its mean (no real images),
  the ResNet-18 drawn at random from a pool once per iteration
  (``extractors.with_auxiliary_pool``; ``Config.auxiliary_model``; the pool from
  ``experiments.pretrain --recipe iid``, ``--pool_dir``).

The optimiser, the queue, the CE term, the init and the presets are IDM's.
"""

import functools

import jax
import jax.numpy as jnp

from idm_jax import extractors, image_update, losses, matching, pretrain
from idm_jax.base import Method
from idm_jax.nn import models

COVARIANCE_WEIGHT = 0.03
SCATTER_WEIGHT = 0.01


def scatter(aux_features):
    """IID's within-class term before its weight: sum_i |z_i - mean_j z_j|^2 over the class's
    synthetic embeddings (P, D) (a sum over the views, not a mean)."""
    return jnp.sum(jnp.square(aux_features - jnp.mean(aux_features, axis=0)))


def iid_objective(real_features, real_mask, syn_features, syn_logits, label, ce_scale, key,
                  *, aux_features, channels: int, match_weight: float = 1.0):
    """One class's IDM objective plus IID's covariance and scatter terms (terms ``mmd``,
    ``ce``, ``covariance``, ``scatter``, the last two unweighted)."""
    loss, terms = matching.idm_objective(real_features, real_mask, syn_features, syn_logits,
                                         label, ce_scale, key, match_weight=match_weight)
    covariance = losses.position_covariance_gap(real_features, syn_features, real_mask,
                                                channels=channels)
    spread = scatter(aux_features)
    loss = loss + COVARIANCE_WEIGHT * covariance + SCATTER_WEIGHT * spread
    return loss, dict(terms, covariance=covariance, scatter=spread)


def objective(config):
    width = getattr(models.get_model(config.model, 1), "width", None)
    if width is None:
        raise ValueError(f"--method iid matches per-channel covariances of a ConvNet's last "
                         f"block; --model {config.model} is not a ConvNet")
    return functools.partial(iid_objective, channels=width, match_weight=config.match_weight)


def queue_with_pool(config, nets):
    """IDM's queue, plus a frozen pretrained network drawn per iteration from the pool in
    ``config.pool_dir`` (checked against the run: network, dataset, validation split)."""
    template = jax.eval_shape(nets.auxiliary_init, jax.random.PRNGKey(0))
    pool = pretrain.load_pool_for(config, template, config.auxiliary_model, "iid", "iid")
    return extractors.with_auxiliary_pool(extractors.queue_schedule(config, nets),
                                          pool["trained"])


METHOD = Method(
    name="iid",
    description="IID on IDM: IDM + 0.03 x per-position channel covariance gap + 0.01 x "
                "within-class scatter under a pretrained ResNet-18",
    objective=objective,
    image_optimizer=image_update.from_config,
    extractors=queue_with_pool,
    defaults=dict(auxiliary_model="ResNet18", distance="linear", moment_weight=0.0),
)
