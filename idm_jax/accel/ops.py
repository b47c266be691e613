"""Operations written for speed on CPU, with the same values as their plain definitions.

Three pieces of XLA's CPU backend are slow for the shapes IDM runs, and each has a rewrite here:

- ``conv2d``: a convolution whose kernel gradient is a few matrix products and whose vmap over
  stacked kernels (several models trained at once) is a loop of plain convolutions, instead of
  XLA's windowed kernel-gradient convolution and grouped convolution;
- ``instance_norm``: instance normalisation with its VJP written out (two fused reductions and
  one elementwise pass);
- ``loop_over_batched_keys``: a random transform whose vmap over keys runs one key at a time,
  each running only its own branch, instead of every ``lax.switch`` branch for every key.

Which of them a run uses is the backend policy's choice (``idm_jax.accel.backend``), made once when
the engine is built; instance norm uses its written-out VJP everywhere. Every rewrite is tested
against the plain formulation and autodiff of it (``tests/test_ops.py``); the timings that
motivated them are in BENCHMARKS.md ("CPU kernels").
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

EPS = 1e-5  # PyTorch's eps for BatchNorm, GroupNorm and LayerNorm.


# --------------------------------------------------------------------------- convolution
#
# XLA's CPU backend runs a plain NHWC convolution and its input gradient through a fast
# (multi-threaded, vectorised) kernel, but two other forms fall onto a slow path:
#
# * the kernel gradient, a "convolution" whose window is the whole feature map and whose
#   contraction runs over the batch; as one shifted-input matrix product per kernel tap
#   (contracting batch x pixels) it is about 4x faster, and for a 3-channel input one im2col
#   product is faster still;
# * a convolution vmapped over stacked kernels (several models trained at once: queue trainees,
#   evaluation models), which becomes a grouped convolution, about 4x slower than the plain
#   convolutions one after another.
#
# (Timings: BENCHMARKS.md, "CPU kernels".)
# ``conv2d`` therefore carries a custom VJP (kernel gradient as matrix products)
# and a custom vmap rule (a stacked kernel runs as a loop of plain convolutions, a stacked input
# alone is folded into the batch, a stacked kernel alone into the output channels). Values are
# those of ``lax.conv_general_dilated``: the forward pass and the input gradient are the same XLA
# convolutions; the kernel gradient sums the same products in another order (float32 rounding).
# Other backends use ``lax.conv_general_dilated`` unchanged (their libraries are fast there);
# the measurements are in BENCHMARKS.md ("CPU kernels").

_NHWC = ("NHWC", "HWIO", "NHWC")


def _plain_conv(x, w, stride, padding):
    return lax.conv_general_dilated(x, w, stride, padding, dimension_numbers=_NHWC)


def _kernel_grad(x, dy, kernel_hw, stride, padding):
    """d(loss)/d(kernel) of a stride/padding NHWC conv as matrix products: (kh, kw, C, O)."""
    n, _, _, c = x.shape
    _, ho, wo, o = dy.shape
    kh, kw = kernel_hw
    (s_h, s_w) = stride
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    dy2 = dy.reshape(-1, o)

    def tap(i, j):   # the input pixels that kernel tap (i, j) multiplies, (N*Ho*Wo, C)
        return lax.slice(xp, (0, i, j, 0), (n, i + s_h * (ho - 1) + 1, j + s_w * (wo - 1) + 1, c),
                         (1, s_h, s_w, 1)).reshape(-1, c)

    contract = (((0,), (0,)), ((), ()))
    taps = [(i, j) for i in range(kh) for j in range(kw)]
    if c * len(taps) <= 64:
        # Few input channels (an RGB first layer): one product with all taps side by side
        # (im2col) keeps the matrix product wide enough to be efficient.
        cols = jnp.concatenate([tap(i, j) for i, j in taps], axis=-1)
        return lax.dot_general(cols, dy2, contract).reshape(kh, kw, c, o)
    return jnp.stack([lax.dot_general(tap(i, j), dy2, contract)
                      for i, j in taps]).reshape(kh, kw, c, o)


@functools.lru_cache(maxsize=None)
def _cpu_conv(stride: tuple, padding: tuple, in_hw: tuple) -> Callable:
    """The custom-VJP, custom-vmap convolution for one static stride/padding/input size."""

    @jax.custom_batching.custom_vmap
    def forward(x, w):
        return _plain_conv(x, w, stride, padding)

    @forward.def_vmap
    def forward_batched(axis_size, in_batched, x, w):
        return _batched_conv(forward, axis_size, in_batched, x, w), True

    def input_grad_plain(dy, w):
        kh, kw = w.shape[:2]
        if stride == (1, 1):
            # A stride-1 conv's input gradient is the conv of dy with the flipped kernel
            # (in/out swapped) and complementary padding. Written as a plain HWIO conv it runs
            # through the fast kernel; the transposed form XLA derives (kernel layout "01oi")
            # is several times slower inside a loop body (BENCHMARKS.md, "CPU kernels").
            flipped = jnp.swapaxes(w[::-1, ::-1], 2, 3)
            pad = ((kh - 1 - padding[0][0], kh - 1 - padding[0][1]),
                   (kw - 1 - padding[1][0], kw - 1 - padding[1][1]))
            if min(min(p) for p in pad) >= 0:
                return _plain_conv(dy, flipped, (1, 1), pad)
        x_shape = jax.ShapeDtypeStruct((dy.shape[0],) + in_hw + (w.shape[2],), dy.dtype)
        return jax.linear_transpose(lambda x: _plain_conv(x, w, stride, padding), x_shape)(dy)[0]

    input_grad = jax.custom_batching.custom_vmap(input_grad_plain)

    @input_grad.def_vmap
    def input_grad_batched(axis_size, in_batched, dy, w):
        dy_b, w_b = in_batched
        if dy_b and not w_b:   # fold the stacked axis into the batch
            dx = input_grad(dy.reshape((-1,) + dy.shape[2:]), w)
            return dx.reshape((axis_size, -1) + dx.shape[1:]), True
        dy = dy if dy_b else jnp.broadcast_to(dy, (axis_size,) + dy.shape)
        w = w if w_b else jnp.broadcast_to(w, (axis_size,) + w.shape)
        return lax.map(lambda a: input_grad(*a), (dy, w)), True

    @jax.custom_vjp
    def conv(x, w):
        return forward(x, w)

    def conv_fwd(x, w):
        return forward(x, w), (x, w)

    def conv_bwd(residuals, dy):
        x, w = residuals
        return (input_grad(dy, w),
                _kernel_grad(x, dy, w.shape[:2], stride, padding).astype(w.dtype))

    conv.defvjp(conv_fwd, conv_bwd)
    return conv


def _batched_conv(conv, axis_size, in_batched, x, w):
    """vmap rule of a convolution (stacked axis first on the batched operands)."""
    x_b, w_b = in_batched
    if x_b and w_b:
        # One plain convolution per stacked kernel; a grouped convolution is several times
        # slower on CPU.
        return lax.map(lambda a: conv(*a), (x, w))
    if x_b:
        y = conv(x.reshape((-1,) + x.shape[2:]), w)
        return y.reshape((axis_size, -1) + y.shape[1:])
    # Stacked kernels, shared input: stack the kernels along the output channels.
    t, kh, kw, c, o = w.shape
    y = conv(x, jnp.moveaxis(w, 0, 3).reshape(kh, kw, c, t * o))
    return jnp.moveaxis(y.reshape(y.shape[:3] + (t, o)), 3, 0)


def conv2d(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
           dimension_numbers=None, feature_group_count=1, precision=None,
           preferred_element_type=None):
    """``lax.conv_general_dilated`` with a faster kernel gradient and vmap rule for CPU.

    Same signature and values as ``lax.conv_general_dilated``. The layers use it when the
    backend policy asks for CPU kernels (``idm_jax.accel.backend``); it covers plain NHWC
    convolutions (explicit padding, no dilation, one group, default precision) and calls
    ``lax.conv_general_dilated`` directly for anything else.
    """
    plain = (lhs.ndim == 4 and feature_group_count == 1
             and not isinstance(padding, str) and precision is None
             and preferred_element_type is None
             and all(d in (None, 1) for d in (lhs_dilation or ()) + (rhs_dilation or ()))
             and _is_nhwc(dimension_numbers, lhs.ndim))
    if not plain:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision,
            preferred_element_type=preferred_element_type)
    conv = _cpu_conv(tuple(int(s) for s in window_strides),
                     tuple((int(lo), int(hi)) for lo, hi in padding), tuple(lhs.shape[1:3]))
    return conv(lhs, rhs)


def _is_nhwc(dimension_numbers, ndim: int) -> bool:
    if dimension_numbers is None or ndim != 4:
        return False
    wanted = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC)
    return lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), dimension_numbers) == wanted


# --------------------------------------------------------------------------- instance norm
def _instance_stats(x, epsilon):
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=(1, 2), keepdims=True)
    return mean, lax.rsqrt(var + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def instance_norm(x, scale, bias, epsilon=EPS):
    """Instance normalisation of float32 NHWC ``x`` with per-channel ``scale`` and ``bias`` (C,).

    ``(x - mean) / sqrt(var + eps) * scale + bias`` with per-image, per-channel statistics over H
    and W (two-pass, biased variance). The VJP is written out: two fused reductions over (g, x)
    and one elementwise pass, against the longer chain of passes over full-size activations
    that differentiating the forward formula gives (the activations are the largest arrays of
    a ConvNet step, so each pass costs memory bandwidth).
    """
    mean, inv = _instance_stats(x, epsilon)
    return (x - mean) * inv * scale + bias


def _instance_norm_fwd(x, scale, bias, epsilon):
    mean, inv = _instance_stats(x, epsilon)
    return (x - mean) * inv * scale + bias, (x, mean, inv, scale)


def _instance_norm_bwd(epsilon, residuals, g):
    x, mean, inv, scale = residuals
    x_hat = (x - mean) * inv
    per_image_g = jnp.sum(g, axis=(1, 2), keepdims=True)              # (N, 1, 1, C)
    per_image_gx = jnp.sum(g * x_hat, axis=(1, 2), keepdims=True)
    count = x.shape[1] * x.shape[2]
    # d/dx of the normalised map: inv * (g' - mean(g') - x_hat * mean(g' * x_hat)), g' = g*scale.
    dx = (inv * scale) * (g - (per_image_g + x_hat * per_image_gx) / count)
    d_scale = jnp.sum(per_image_gx, axis=(0, 1, 2))
    d_bias = jnp.sum(per_image_g, axis=(0, 1, 2))
    return dx, d_scale.astype(scale.dtype), d_bias.astype(scale.dtype)


instance_norm.defvjp(_instance_norm_fwd, _instance_norm_bwd)


# --------------------------------------------------------------------------- keyed transforms
def loop_over_batched_keys(plain: Callable) -> Callable:
    """``plain(key, x)`` with a vmap rule that loops over batched keys, and its matching VJP.

    ``plain`` is a random transform that picks one branch from its key (``lax.switch``). Under
    ``vmap`` with batched keys the branch index is batched, and ``lax.switch`` would then run
    every branch and select per key. The rule instead maps over the keys (each step runs only
    its own branch). The loop bodies call the rule-carrying function again, so nested vmaps loop
    too. Values are those of ``plain``; a key has no cotangent, and forward-mode ``jax.jvp`` is
    not supported (the custom VJP replaces it).
    """

    def pullback(key, images, cotangent):
        return jax.vjp(lambda x: plain(key, x), images)[1](cotangent)[0]

    def looped(fn):
        wrapped = jax.custom_batching.custom_vmap(fn)

        @wrapped.def_vmap
        def rule(axis_size, in_batched, key, *arrays):
            if not in_batched[0]:
                # One key for the whole stack: the ordinary batching.
                axes = tuple(0 if b else None for b in in_batched)
                return jax.vmap(fn, in_axes=axes)(key, *arrays), True
            arrays = [a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)
                      for a, b in zip(arrays, in_batched[1:])]
            return lax.map(lambda args: wrapped(*args), (key, *arrays)), True

        return wrapped

    forward = looped(plain)
    backward = looped(pullback)

    @jax.custom_vjp
    def transform(key, images):
        return forward(key, images)

    def transform_fwd(key, images):
        return forward(key, images), (key, images)

    def transform_bwd(residuals, cotangent):
        key, images = residuals
        # Recomputes the (cheap) chosen transform.
        return None, backward(key, images, cotangent)

    transform.defvjp(transform_fwd, transform_bwd)
    return transform


__all__ = ["EPS", "conv2d", "instance_norm", "loop_over_batched_keys"]
