"""Matching: one extractor, every class at once, one update of the images.

One matching pass (for IDM, docs/FAITHFULNESS.md, "matching"):

1. draw an extractor from the method's schedule (IDM: from the queue); its running accuracy
   scales the CE term;
2. draw each class's real batch, augment it with the class's Siamese DSA key and embed it
   (``real_features``: constants, no gradient);
3. expand each class's synthetic images (partition-and-expand), augment them with the *same*
   key, embed them (``synthetic_outputs``);
4. score every class with the objective (``class_objectives``), and step the images with the
   method's image optimiser (``base.ImageOptimizer``).

The objective is one replaceable function (``base.Objective``): IDM's is ``idm_objective`` with
the linear-kernel MMD as its distance. Classes are a vmapped axis; ``sharding.ClassLayout`` pads and
splits that axis on a device mesh, so nothing here branches on the mesh.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from idm_jax import losses, partition
from idm_jax.accel import microbatch
from idm_jax import real as real_lib
from idm_jax.base import Objective
from idm_jax.accel.sharding import ClassLayout

# The run's engine (``engine.Engine``; named here without importing it: the engine imports this).
Engine = Any

# distance(real_features (B, D), syn_features (P, D), real_mask (B,), key) -> scalar, with the
# real features constants; the key is the class's own (for distances that draw at random).
Distance = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
# moment(real_features (B, D), syn_features (P, D), real_mask (B,)) -> scalar.
Moment = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def linear_distance(real_features, syn_features, real_mask, key):
    """IDM's distance: the linear-kernel MMD of mean embeddings (``losses.mmd``)."""
    del key
    return losses.mmd(real_features, syn_features, real_mask)


def idm_objective(real_features, real_mask, syn_features, syn_logits, label, ce_scale, key,
                  *, distance: Distance = linear_distance, moment: Moment | None = None,
                  moment_weight: float = 0.0, match_weight: float = 1.0):
    """One class's IDM objective: ``distance(real, syn) + ce_scale * CE(syn_logits, label)``,
    plus ``moment_weight * moment(real, syn)`` when a moment term is given.

    Args:
      real_features: (B, D) embeddings of the class's augmented real batch (constants).
      real_mask: (B,) valid real rows (a class with fewer than B images pads its batch).
      syn_features: (P, D) embeddings of the class's expanded, augmented synthetic images.
      syn_logits: (P, L) their logits.
      label: () int, the class.
      ce_scale: () the CE weight, ``ce_weight * extractor accuracy %`` (a constant).
      key: the class's Siamese DSA key; IDM's distance draws nothing from it. A distance that
        draws at random gets ``fold_in(key, 1)``, a stream the augmentation does not use.
      distance: the matching distance; IDM's is the linear-kernel MMD (``linear_distance``).
      moment, moment_weight: an optional moment term (``losses.covariance_gap``, ...) and its
        weight; None (IDM) leaves it out of the program.
      match_weight: the distance's weight; 1 (IDM) leaves the program as it is, 0 is the
        CE-only control (the distance is still reported in the terms, unweighted).

    Returns (loss, terms): "mmd" the distance term, "ce" the unscaled cross-entropy, and
    "moment" when there is a moment term.
    """
    match = distance(real_features, syn_features, real_mask, jax.random.fold_in(key, 1))
    labels = jnp.broadcast_to(label, syn_logits.shape[:1])
    ce = losses.class_aware_ce(syn_logits, labels, 1.0)
    weighted = match if match_weight == 1.0 else match_weight * match
    loss, terms = weighted + ce_scale * ce, {"mmd": match, "ce": ce}
    if moment is not None:
        terms["moment"] = moment(real_features, syn_features, real_mask)
        loss = loss + moment_weight * terms["moment"]
    return loss, terms


def make_distance(config) -> Distance:
    """The config's matching distance (``config.distance``)."""
    if config.distance == "linear":
        return linear_distance
    if config.distance == "gaussian":
        bandwidths, unbiased = config.bandwidths, config.mmd_unbiased
        return lambda r, s, m, key: losses.gaussian_mmd(r, s, m, bandwidths, unbiased)
    if config.distance == "characteristic":
        return functools.partial(_characteristic, frequencies=config.cf_frequencies,
                                 scale=config.cf_scale)
    raise ValueError(f"unknown distance {config.distance!r}")


def _characteristic(real, syn, mask, key, *, frequencies, scale):
    return losses.characteristic_distance(real, syn, mask, key=key,
                                          num_frequencies=frequencies, scale=scale)


def make_objective(config) -> Objective:
    """The objective a config asks for: its distance, CE, and the moment term if weighted."""
    moment = None
    if config.moment_weight > 0:
        moment = {"covariance": losses.covariance_gap, "variance": losses.variance_gap}[
            config.moment]
    return functools.partial(idm_objective, distance=make_distance(config), moment=moment,
                             moment_weight=config.moment_weight,
                             match_weight=config.match_weight)


def draw_extractor(engine: Engine, extractors, key: jax.Array):
    """The schedule's extractor for one pass: (its params, its running accuracy %, the CE
    scale ``ce_weight * accuracy``, 0 without the CE term)."""
    params, accuracy = engine.extractors.draw(extractors, key)
    config = engine.config
    ce_scale = config.ce_weight * accuracy if config.syn_ce else jnp.float32(0.0)
    return params, accuracy, ce_scale


def _augment(engine: Engine, key: jax.Array, images: jax.Array) -> jax.Array:
    return engine.policy.augment(key, images, engine.config.matching_dsa, siamese=True)


def _per_class_views(views_of, keys: jax.Array, images: jax.Array,
                     layout: ClassLayout) -> jax.Array:
    """``views_of(key, images)`` for every class (keys (K_padded, 2), images (K_padded, ...)),
    each device over its own classes: the CPU's DSA loop over keys would otherwise gather every
    class's images onto every device."""
    def block(_, part):
        return jax.vmap(views_of)(*part)
    return layout.per_device(block)(None, (keys, images))


def _embed(engine: Engine, params, images: jax.Array, layout: ClassLayout):
    """(n, H, W, C) -> (embedding, logits), in chunks of the policy's size on each device.

    Chunks are cut from each device's own block of the batch: a lax.map over the global batch
    would gather it onto every device, and whole batches would not fit (K = 1000 classes).
    """
    def embed(p, x):
        return microbatch.apply_in_chunks(lambda y: engine.apply(p, y), x, engine.policy.chunk,
                                          remat=engine.policy.remat)
    return layout.per_device(embed)(params, images)


def real_features(engine: Engine, params, real: real_lib.RealData, idx: jax.Array,
                  dsa_keys: jax.Array, layout: ClassLayout) -> jax.Array:
    """Embeddings of every class's augmented real batch: (K_padded, B, D), no gradient.

    ``idx`` (K_padded, B) are rows into each class's images; ``dsa_keys`` (K_padded, 2).
    """
    images = layout.constrain(real_lib.gather_class_batches(real, idx,
                                                            engine.config.normalize_train))
    views = layout.constrain(_per_class_views(functools.partial(_augment, engine), dsa_keys,
                                              images, layout))
    features, _ = _embed(engine, params, views.reshape((-1,) + real.image_shape), layout)
    return layout.constrain(jax.lax.stop_gradient(features.reshape(idx.shape + (-1,))))


def synthetic_outputs(engine: Engine, params, syn: jax.Array, dsa_keys: jax.Array,
                      layout: ClassLayout, aux_params=None):
    """Expand, augment and embed every class's synthetic images.

    ``syn`` (K_padded, ipc, H, W, C) -> embeddings (K_padded, P*ipc, D) and logits
    (K_padded, P*ipc, L), with P pieces per stored image; with ``aux_params`` also the
    auxiliary network's embeddings of the same views (K_padded, P*ipc, D_aux).
    """
    config = engine.config

    def expand_and_augment(images, key):
        if config.partition_expand:
            images = partition.expand(images, config.partition, config.partition_factor,
                                      config.partition_ratio)
        return _augment(engine, key, images)

    views = layout.constrain(_per_class_views(
        lambda key, images: expand_and_augment(images, key), dsa_keys, syn, layout))
    num_classes, per_class = views.shape[:2]
    flat = views.reshape((-1,) + views.shape[2:])
    embedding, logits = _embed(engine, params, flat, layout)
    outputs = (layout.constrain(embedding.reshape(num_classes, per_class, -1)),
               layout.constrain(logits.reshape(num_classes, per_class, -1)))
    if aux_params is None:
        return outputs
    aux = layout.per_device(lambda p, x: microbatch.apply_in_chunks(
        lambda y: engine.aux_apply(p, y), x, engine.policy.chunk,
        remat=engine.policy.remat))(aux_params, flat)
    return outputs + (layout.constrain(aux.reshape(num_classes, per_class, -1)),)


def class_objectives(engine: Engine, params, syn, features, real_mask, dsa_keys, ce_scale,
                     layout: ClassLayout, extractors=None):
    """Every class's objective at its synthetic images ``syn`` (K_padded, ipc, H, W, C).

    ``extractors`` (the schedule's state) is needed only with an auxiliary network, whose
    params the schedule holds. Returns (K,) losses and a dict of (K,) terms; padding classes
    are dropped.
    """
    aux_params = None if engine.aux_apply is None else engine.extractors.auxiliary(extractors)
    outputs = synthetic_outputs(engine, params, syn, dsa_keys, layout, aux_params)
    embedding, logits = outputs[:2]
    # Padding classes of a sharded run (past the model's classes) borrow the last label; their
    # losses are dropped below.
    labels = jnp.minimum(jnp.arange(syn.shape[0]), logits.shape[-1] - 1)
    if aux_params is None:
        loss, terms = jax.vmap(engine.objective, in_axes=(0, 0, 0, 0, 0, None, 0))(
            features, real_mask, embedding, logits, labels, ce_scale, dsa_keys)
    else:
        def objective(f, m, e, lg, lab, key, aux):
            return engine.objective(f, m, e, lg, lab, ce_scale, key, aux_features=aux)
        loss, terms = jax.vmap(objective)(features, real_mask, embedding, logits, labels,
                                          dsa_keys, outputs[2])
    return layout.unpad(loss), jax.tree.map(layout.unpad, terms)


def _pass_setup(engine: Engine, real: real_lib.RealData, images, opt_state, extractors,
                key: jax.Array, layout: ClassLayout):
    """What one matching pass fixes before differentiating: the extractor, each class's real
    features, the DSA keys, and the point where the gradient is taken. Returns
    (class_loss, point, accuracy, ce_scale): ``class_loss(syn (K, ipc, H, W, C)) -> (loss (K,),
    terms)`` and ``point`` (K*ipc, H, W, C)."""
    config = engine.config
    k_slot, k_real, k_dsa = jax.random.split(key, 3)
    params, accuracy, ce_scale = draw_extractor(engine, extractors, k_slot)

    batch = min(config.batch_real, real.max_per_class)
    idx, mask = real_lib.class_batch_indices(k_real, real.counts, real.max_per_class, batch,
                                             config.real_sampling)
    idx, mask = layout.constrain(layout.pad(idx)), layout.constrain(layout.pad(mask))
    dsa_keys = layout.pad(jax.random.split(k_dsa, real.num_classes))  # one per class, Siamese
    features = real_features(engine, params, real, idx, dsa_keys, layout)

    def class_loss(syn):     # syn padded to the layout's classes
        return class_objectives(engine, params, syn, features, mask, dsa_keys, ce_scale, layout,
                                extractors)

    optimizer = engine.image_optimizer
    point = images if optimizer.grad_point is None else optimizer.grad_point(opt_state, images)
    return class_loss, point, accuracy, ce_scale


def match(engine: Engine, real: real_lib.RealData, images: jax.Array, opt_state,
          extractors, key: jax.Array, layout: ClassLayout):
    """One matching pass over all classes with one extractor drawn from the schedule.

    Args:
      images: (K*ipc, H, W, C) the synthetic set; opt_state: its optimiser's state.
      extractors: the extractor schedule's state.
      key: this pass's key (extractor, real batches, DSA).

    Returns (images, opt_state, metrics): the updated set and state, and scalar metrics.
    """
    class_loss, point, accuracy, ce_scale = _pass_setup(engine, real, images, opt_state,
                                                        extractors, key, layout)

    def total_loss(syn):
        loss, terms = class_loss(syn)
        return jnp.sum(loss), (loss, terms)

    def grad_at(syn):
        grads, aux = jax.grad(total_loss, has_aux=True)(layout.constrain(layout.pad(syn)))
        return layout.unpad(grads), aux

    shape = (real.num_classes, engine.config.ipc) + real.image_shape
    optimizer = engine.image_optimizer
    grads, (loss, terms) = grad_at(layout.constrain(point.reshape(shape)))
    images, opt_state = optimizer.update(grads.reshape(images.shape), opt_state, images,
                                         jnp.sum(loss), point)
    metrics = {"loss": jnp.mean(loss), **{k: jnp.mean(v) for k, v in terms.items()},
               "ce_scale": ce_scale, "extractor_acc": accuracy}
    return images, opt_state, metrics


def calibrate(engine: Engine, real: real_lib.RealData, images: jax.Array, opt_state,
              extractors, key: jax.Array, layout: ClassLayout):
    """A calibration pass (NCFM's): every class's ``calibration_weight`` x cross-entropy of its
    expanded, augmented synthetic images under the schedule's calibration network (a trained
    one), then one update of the images with the method's optimiser. No real images.

    Same arguments and returns as ``match``; the metric is ``calibration`` (weighted, mean over
    classes).
    """
    config = engine.config
    params = engine.extractors.calibration(extractors)
    dsa_keys = layout.pad(jax.random.split(key, real.num_classes))

    def total_loss(syn):
        _, logits = synthetic_outputs(engine, params, syn, dsa_keys, layout)[:2]
        labels = jnp.minimum(jnp.arange(syn.shape[0]), logits.shape[-1] - 1)
        ce = jax.vmap(lambda lg, c: losses.class_aware_ce(
            lg, jnp.broadcast_to(c, lg.shape[:1]), config.calibration_weight))(logits, labels)
        ce = layout.unpad(ce)
        return jnp.sum(ce), ce

    shape = (real.num_classes, config.ipc) + real.image_shape
    optimizer = engine.image_optimizer
    point = images if optimizer.grad_point is None else optimizer.grad_point(opt_state, images)
    grads, ce = jax.grad(total_loss, has_aux=True)(
        layout.constrain(layout.pad(layout.constrain(point.reshape(shape)))))
    images, opt_state = optimizer.update(layout.unpad(grads).reshape(images.shape), opt_state,
                                         images, jnp.sum(ce), point)
    return images, opt_state, {"calibration": jnp.mean(ce)}


def term_gradient_norms(engine: Engine, real: real_lib.RealData, images, opt_state,
                        extractors, key: jax.Array, layout: ClassLayout) -> dict:
    """L2 norms, over the whole set, of the gradient of the summed loss (``loss``) and of each
    term the objective reports, unweighted (``mmd``, ``ce``, ...), w.r.t. the normalised images
    at the pass's gradient point (and ``ce_scale``, the CE term's weight there); the same draws
    as ``match`` with these arguments. Tells whether a step size suits a distance: the step
    moves the images by about lr x these."""
    class_loss, point, _, ce_scale = _pass_setup(engine, real, images, opt_state, extractors,
                                                 key, layout)
    shape = (real.num_classes, engine.config.ipc) + real.image_shape
    point = layout.constrain(layout.pad(layout.constrain(point.reshape(shape))))
    names = ["loss"] + sorted(jax.eval_shape(class_loss, point)[1])

    def summed(name):
        def value(syn):
            loss, terms = class_loss(syn)
            return jnp.sum(loss if name == "loss" else terms[name])
        return value

    norms = {name: jnp.sqrt(jnp.sum(jnp.square(layout.unpad(jax.grad(summed(name))(point)))))
             for name in names}
    return dict(norms, ce_scale=ce_scale)


__all__ = ["Distance", "Moment", "linear_distance", "idm_objective",
           "make_distance", "make_objective", "draw_extractor",
           "real_features", "synthetic_outputs", "class_objectives", "match", "calibrate",
           "term_gradient_norms"]
