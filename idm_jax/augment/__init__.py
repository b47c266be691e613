"""Differentiable Siamese Augmentation (DSA), as used by DM and IDM.

DSA is a family of image transforms that are differentiable with respect to the
pixels, so a loss computed on augmented *synthetic* images can be back-propagated
into those images. "Siamese" means that two batches (a real batch and a synthetic
batch of the same class) receive the *same* random transform, so the matching loss
compares like with like.

One call of :func:`dsa` does the following (docs/FAITHFULNESS.md, "DSA"):

1. The strategy string, e.g. ``"color_crop_cutout_flip_scale_rotate"``, is split on
   ``'_'`` into groups. One group is chosen uniformly at random per call.
2. Only that group runs. ``color`` is brightness, then saturation, then contrast. Every
   other group is a single op: ``crop`` (integer translation with zero fill),
   ``cutout``, ``flip`` (width axis), ``scale`` and ``rotate`` (bilinear affine
   resampling with zero padding). A group may join several ops with ``'+'``, e.g.
   ``"color+crop+cutout"``: they all run, in that order, each with its own parameter draw
   (IDC's and M3D's augmentation during condensation: colour, crop and cutout every time).
3. With ``siamese=True`` a single parameter set is drawn from the key and shared by
   every image. The draw does not depend on the batch size, so the same key applied to
   a 256-image real batch and a 40-image synthetic batch gives the same transform.
   With ``siamese=False`` (evaluation training) the group is still one per call, but
   the parameters are drawn independently per image.

The transforms themselves, with explicit parameters, are in ``idm_jax.augment.transforms`` and
``idm_jax.augment.resample`` (re-exported
here).

Randomness: ``dsa`` splits its key into a group-choice key and a parameter key. The
parameter key gives one block of uniforms in [0, 1), of shape (3,) (Siamese) or
(N, 3) (per image), and the chosen group maps it to its parameters (integers via
``floor(u * n)``). The ranges and distributions are those of the official code. The
random streams cannot match PyTorch's wall-clock-seeded ones, and need not.
"""

from __future__ import annotations

import functools
import math
from typing import Mapping

import jax
import jax.numpy as jnp
from jax import lax

from idm_jax.accel import ops
from idm_jax.augment.resample import affine_sample, rotate, rotate_theta, scale, scale_theta
from idm_jax.augment.transforms import (DSAParams, brightness, contrast, crop_shift, cutout,
                                        cutout_size, flip, saturation, translate)
from idm_jax.augment.transforms import _check_images  # the input check dsa shares with the ops

Array = jax.Array

VALID_OPS: tuple[str, ...] = ("color", "crop", "cutout", "flip", "scale", "rotate")
DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
_IDENTITY_STRATEGIES = ("", "none", "None")


def parse_strategy(strategy: str | None) -> tuple[str, ...]:
    """Splits a DSA strategy string into its groups.

    Args:
      strategy: e.g. ``"color_crop_cutout_flip_scale_rotate"``. ``""``, ``"none"``,
        ``"None"`` and ``None`` mean no augmentation.

    Returns:
      The group names in order. Duplicates are kept (as in the official code, where a
      repeated group is proportionally more likely). Empty for the identity. A group of
      ``'+'``-joined ops (``"color+crop+cutout"``) is one entry that runs all its ops.

    Raises:
      ValueError: for an unknown or empty group name.
    """
    if strategy is None or strategy in _IDENTITY_STRATEGIES:
        return ()
    if not isinstance(strategy, str):
        raise ValueError(f"DSA strategy must be a string, got {type(strategy).__name__}.")
    groups = tuple(strategy.split("_"))
    bad = [op for g in groups for op in g.split("+") if op not in VALID_OPS]
    if bad:
        raise ValueError(
            f"Unknown DSA op(s) {bad} in strategy {strategy!r}. Valid ops are "
            f"{list(VALID_OPS)}, joined with '_' (or 'none' for no augmentation)."
        )
    return groups


# ------------------------------------------------------------------ random sampling


def select_group(key: Array, strategy: str = DEFAULT_STRATEGY) -> Array:
    """Index (int32 scalar) of the group that ``dsa(key, ..., strategy)`` runs.

    The choice is uniform over the entries of ``parse_strategy(strategy)``. Raises
    ValueError for the identity strategy, which has no group.
    """
    groups = parse_strategy(strategy)
    if not groups:
        raise ValueError("The identity strategy ('' or 'none') has no group to select.")
    return jax.random.randint(_split_key(key)[0], (), 0, len(groups))


def group_params(
    key: Array,
    group: str,
    num_images: int,
    image_hw: tuple[int, int],
    siamese: bool = True,
    params: DSAParams = DSAParams(),
) -> dict[str, Array]:
    """Random parameters that ``dsa(key, ...)`` uses when it runs ``group``.

    Args:
      key: the key passed to :func:`dsa`. The same sub-key is derived here.
      group: one of ``VALID_OPS``.
      num_images: N, used only when ``siamese`` is False.
      image_hw: (H, W) of the images.
      siamese: True draws one value per parameter (shape ()), independent of N.
        False draws one value per image (shape (N,)).
      params: the ranges.

    Returns:
      A dict of float32/int32/bool arrays, keyed by the keyword names of the op
      functions: color -> ``brightness``, ``saturation``, ``contrast`` (uniform
      draws ``u``); crop -> ``tx``, ``ty``; cutout -> ``ox``, ``oy``; flip ->
      ``do_flip``; scale -> ``sx``, ``sy``; rotate -> ``angle`` (radians).
    """
    if group not in VALID_OPS:
        raise ValueError(f"Unknown DSA op {group!r}; valid ops are {list(VALID_OPS)}.")
    shape = () if siamese else (int(num_images),)
    u = _uniform_block(_split_key(key)[1], shape)
    return _params_from_uniform(u, group, image_hw, params)


def _split_key(key: Array) -> tuple[Array, Array]:
    """(group-choice key, parameter key) derived from a dsa key."""
    k_group, k_params = jax.random.split(key)
    return k_group, k_params


def _uniform_block(key: Array, shape: tuple[int, ...]) -> Array:
    """The uniform draws in [0, 1) that every group maps to its parameters.

    One block of shape ``shape + (3,)`` serves all groups (3 = most values any group
    needs). Only one group runs per call, so sharing the block creates no dependence
    within a call. With ``shape == ()`` (Siamese) the block does not depend on N.
    Drawing once, outside ``lax.switch``, keeps the RNG out of the branches (under
    vmap every branch runs) and keeps compilation small.
    """
    return jax.random.uniform(key, shape + (3,), jnp.float32)


def _uniform_int(u: Array, low: int, high: int) -> Array:
    """Maps u ~ U[0, 1) to a uniform integer in [low, high)."""
    k = jnp.floor(u * (high - low)).astype(jnp.int32)
    # float32 rounding can give u * n == n for u just below 1.
    return low + jnp.minimum(k, high - low - 1)


def _params_from_uniform(u: Array, group: str, image_hw, params: DSAParams) -> dict[str, Array]:
    """Maps a uniform block ``u`` (shape (..., 3)) to the parameters of ``group``."""
    h, w = image_hw
    u0, u1, u2 = u[..., 0], u[..., 1], u[..., 2]
    if group == "color":
        return {"brightness": u0, "saturation": u1, "contrast": u2}
    if group == "crop":
        sh, sw = crop_shift(h, params.ratio_crop_pad), crop_shift(w, params.ratio_crop_pad)
        return {"tx": _uniform_int(u0, -sh, sh + 1), "ty": _uniform_int(u1, -sw, sw + 1)}
    if group == "cutout":
        lh, lw = cutout_size(h, params.ratio_cutout), cutout_size(w, params.ratio_cutout)
        # Centres range over [0, size + (1 - L mod 2)), as in the official code.
        return {
            "ox": _uniform_int(u0, 0, h + (1 - lh % 2)),
            "oy": _uniform_int(u1, 0, w + (1 - lw % 2)),
        }
    if group == "flip":
        return {"do_flip": u0 < params.prob_flip}
    if group == "scale":
        r = params.ratio_scale
        return {"sx": u0 * (r - 1.0 / r) + 1.0 / r, "sy": u1 * (r - 1.0 / r) + 1.0 / r}
    if group == "rotate":
        return {"angle": (u0 - 0.5) * 2.0 * params.ratio_rotate * (math.pi / 180.0)}
    raise ValueError(f"Unknown DSA op {group!r}; valid ops are {list(VALID_OPS)}.")


def apply_group(
    group: str, x: Array, p: Mapping[str, Array], params: DSAParams = DSAParams()
) -> Array:
    """Applies one DSA group with explicit parameters ``p`` (see :func:`group_params`).

    Args:
      group: one of ``VALID_OPS``.
      x: (N, H, W, C) float images.
      p: the parameters, each of shape () or (N,).
      params: the ranges. They give the colour strengths and the crop/cutout sizes.

    Returns:
      (N, H, W, C), same dtype as ``x``.
    """
    _, h, w, _ = x.shape
    if group == "color":
        x = brightness(x, p["brightness"], params.brightness)
        x = saturation(x, p["saturation"], params.saturation)
        return contrast(x, p["contrast"], params.contrast)
    if group == "crop":
        bound = (crop_shift(h, params.ratio_crop_pad), crop_shift(w, params.ratio_crop_pad))
        return translate(x, p["tx"], p["ty"], max_shift=bound)
    if group == "cutout":
        side = (cutout_size(h, params.ratio_cutout), cutout_size(w, params.ratio_cutout))
        return cutout(x, p["ox"], p["oy"], side)
    if group == "flip":
        return flip(x, p["do_flip"])
    if group == "scale":
        return scale(x, p["sx"], p["sy"])
    if group == "rotate":
        return rotate(x, p["angle"])
    raise ValueError(f"Unknown DSA op {group!r}; valid ops are {list(VALID_OPS)}.")


def _dsa_plain(key: Array, images: Array, strategy: str, siamese: bool,
               params: DSAParams) -> Array:
    """One random group of ``strategy`` on ``images`` (the body of :func:`dsa`)."""
    groups = parse_strategy(strategy)
    n, h, w, _ = images.shape
    k_group, k_params = _split_key(key)
    u = _uniform_block(k_params, () if siamese else (n,))

    def branch(group: str):
        def run(x):
            if "+" not in group:
                return apply_group(group, x, _params_from_uniform(u, group, (h, w), params),
                                   params)
            # Each op of a composite group draws its own block, so the ops are independent;
            # the block still does not depend on N when Siamese.
            for i, op in enumerate(group.split("+")):
                u_op = _uniform_block(jax.random.fold_in(k_params, i), u.shape[:-1])
                x = apply_group(op, x, _params_from_uniform(u_op, op, (h, w), params), params)
            return x

        return run

    if len(groups) == 1:
        return branch(groups[0])(images)
    index = jax.random.randint(k_group, (), 0, len(groups))  # as select_group
    return lax.switch(index, [branch(g) for g in groups], images)


@functools.lru_cache(maxsize=None)
def _dsa_looped(strategy: str, siamese: bool, params: DSAParams):
    """``_dsa_plain`` whose vmap over keys runs one key at a time (``ops``; same values)."""
    return ops.loop_over_batched_keys(
        functools.partial(_dsa_plain, strategy=strategy, siamese=siamese, params=params))


@functools.partial(jax.jit, static_argnames=("strategy", "siamese", "params", "loop_over_keys"))
def dsa(
    key: Array,
    images: Array,
    strategy: str = DEFAULT_STRATEGY,
    siamese: bool = True,
    params: DSAParams = DSAParams(),
    loop_over_keys: bool = False,
) -> Array:
    """Differentiable (Siamese) augmentation of a batch: one random group per call.

    Args:
      key: a ``jax.random`` key. It decides the group and every parameter.
      images: (N, H, W, C) float images, normalised.
      strategy: static string, groups joined by ``'_'`` (see ``VALID_OPS``);
        ``""`` or ``"none"`` returns ``images`` unchanged.
      siamese: True (matching): one parameter set, drawn independently of N, shared
        by all images. So two batches augmented with the same key get the same
        transform. False (evaluation training): independent parameters per image.
      params: static :class:`DSAParams`.
      loop_over_keys: static; under ``vmap`` with batched keys, run the keys one after another,
        each running only its own group (``ops.loop_over_batched_keys``, the backend policy's
        ``cpu_kernels``: much cheaper on CPU), instead of ``lax.switch`` evaluating every group
        and selecting per key (the default; the engine passes its policy's choice). Same values.

    Returns:
      (N, H, W, C), same dtype as ``images``; differentiable (reverse mode) with
      respect to ``images``.

    Raises:
      ValueError: for an unknown op name, or images that are not rank-4 float.

    The function is jitted with ``strategy``, ``siamese`` and ``params`` static, so
    eager calls compile once per shape and setting (an un-jitted ``lax.switch`` would
    re-trace and re-compile its branches on every call). Inside an outer ``jit``,
    ``vmap`` or ``grad`` it composes as usual. With ``loop_over_keys`` a custom VJP
    carries the loop into the backward pass, so forward-mode ``jax.jvp`` through
    ``dsa`` is then not supported (nothing in the method needs it).
    """
    groups = parse_strategy(strategy)
    _check_images(images)
    if not groups:
        return images
    if not loop_over_keys:
        return _dsa_plain(key, images, strategy, siamese, params)
    return _dsa_looped(strategy, siamese, params)(key, images)


__all__ = (
    "VALID_OPS",
    "DEFAULT_STRATEGY",
    "DSAParams",
    "parse_strategy",
    "crop_shift",
    "cutout_size",
    "brightness",
    "saturation",
    "contrast",
    "translate",
    "cutout",
    "flip",
    "scale",
    "rotate",
    "scale_theta",
    "rotate_theta",
    "affine_sample",
    "select_group",
    "group_params",
    "apply_group",
    "dsa",
)
