"""Networks of DC/DM/IDM (``dc_networks.py``) as Flax linen modules over NHWC images.

IDM matches feature means of a ConvNet: the *embedding* is exactly the input of the final linear
classifier (the flattened feature map), and the class-aware regulariser needs the logits of the
same forward pass. Every module here therefore returns ``(embedding, logits)`` from one call.

Conventions (reference sections 5.1-5.6):

* Input ``x`` is ``(N, H, W, C)``. The channel count is read from the input, so one module works
  for 1-channel 28x28 (MNIST-style) and 3-channel 32/64/224 inputs. As in DC, a 1-channel input
  gets a wider padding on the first conv (ConvNet/VGG: 3, AlexNet: 4, LeNet: 2), which turns
  28x28 into 32x32 for the ConvNet/AlexNet/VGG stacks.
* Flattening is NHWC order (H, W, C), not PyTorch's (C, H, W). This is a fixed permutation of the
  feature axis: MMD and the classifier are unaffected, only imported PyTorch weights would need
  a permutation of the classifier rows.
* Initialisation is PyTorch's default: every conv/dense kernel and bias is drawn from
  ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with ``fan_in = in_channels * kh * kw``; norm scales are
  1 and norm shifts 0.
* ``dtype`` is the compute dtype (e.g. ``jnp.bfloat16`` for mixed precision). Parameters and
  normalisation statistics stay float32, and the returned embedding and logits are float32.
* BatchNorm follows PyTorch: ``train=True`` normalises with the biased batch variance and updates
  the running averages (collection ``batch_stats``, call ``apply`` with
  ``mutable=['batch_stats']``) as ``running = 0.9 * running + 0.1 * batch`` with the *unbiased*
  batch variance; ``train=False`` normalises with the running averages; eps is 1e-5. An optional
  boolean ``mask`` of shape (N,) excludes padded rows from the batch statistics. Models without
  BatchNorm accept and ignore ``train`` and ``mask``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any

NORMS = ("instancenorm", "batchnorm", "layernorm", "groupnorm", "none")
ACTIVATIONS = ("relu", "sigmoid", "leakyrelu", "swish")
POOLINGS = ("avgpool", "maxpool", "none")

_EPS = 1e-5  # PyTorch's eps for BatchNorm, GroupNorm and LayerNorm.


# --------------------------------------------------------------------------------------------
# Initialisers (PyTorch defaults)
# --------------------------------------------------------------------------------------------

# kaiming_uniform(a=sqrt(5)) in PyTorch has bound sqrt(6 / ((1 + 5) * fan_in)) = 1/sqrt(fan_in);
# a uniform variance-scaling init with scale 1/3 has bound sqrt(3 * (1/3) / fan_in), the same.
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> Callable[..., jnp.ndarray]:
    """PyTorch's default bias init, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.

    Flax bias initialisers only see the bias shape, so the layer's fan-in is bound here.

    Args:
      fan_in: number of inputs of one output unit (``in_channels * kh * kw`` or in_features).
    Returns:
      an initialiser ``(key, shape, dtype=float32) -> array``.
    """
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# --------------------------------------------------------------------------------------------
# Convolution with a CPU-friendly gradient and batching rule
# --------------------------------------------------------------------------------------------
#
# XLA's CPU backend runs a plain NHWC convolution and its input gradient through a fast
# (multi-threaded, vectorised) kernel, but two other forms fall onto a slow path (measured on the
# 2-core development CPU, ConvNet-3 layer 2, 256 x 16 x 16 x 128 -> 128, process CPU time):
#
# * the kernel gradient, a "convolution" whose window is the whole 16 x 16 feature map and whose
#   contraction runs over the batch: ~1.9 s against ~0.25 s for the forward pass. As nine
#   shifted-input matrix products (one per kernel tap, contracting batch x pixels) it takes
#   ~0.47 s; for a 3-channel input one im2col product is faster still;
# * a convolution vmapped over stacked kernels (several models trained at once: queue trainees,
#   evaluation models), which becomes a grouped convolution: 2.1 s against 2 x 0.25 s for two
#   plain convolutions one after another.
#
# ``conv2d`` therefore carries, on CPU only, a custom VJP (kernel gradient as matrix products)
# and a custom vmap rule (a stacked kernel runs as a loop of plain convolutions, a stacked input
# alone is folded into the batch, a stacked kernel alone into the output channels). Values are
# those of ``lax.conv_general_dilated``: the forward pass and the input gradient are the same XLA
# convolutions; the kernel gradient sums the same products in another order (float32 rounding).
# Other backends use ``lax.conv_general_dilated`` unchanged (their libraries are fast there).

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
            # is ~4x slower inside a loop body (measured in lax.map at 256 x 16 x 16 x 128).
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
    """``lax.conv_general_dilated`` with a faster kernel gradient and vmap on CPU.

    Same signature and values as ``lax.conv_general_dilated``; it is the convolution of every
    conv layer here (``nn.Conv(conv_general_dilated=conv2d)``). The CPU path covers plain NHWC
    convolutions (explicit padding, no dilation, one group, default precision); anything else,
    and every non-CPU backend, calls ``lax.conv_general_dilated`` directly.
    """
    plain = (jax.default_backend() == "cpu" and lhs.ndim == 4 and feature_group_count == 1
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


def _conv(x: jnp.ndarray, features: int, kernel: int, *, padding: int, stride: int = 1,
          use_bias: bool = True, dtype: Dtype, name: str) -> jnp.ndarray:
    """Square conv with PyTorch init and symmetric zero padding; called inside a compact method."""
    fan_in = kernel * kernel * x.shape[-1]
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((padding, padding), (padding, padding)), use_bias=use_bias,
                   dtype=dtype, param_dtype=jnp.float32, kernel_init=torch_kernel_init,
                   bias_init=torch_bias_init(fan_in), conv_general_dilated=conv2d,
                   name=name)(x)


def _dense(x: jnp.ndarray, features: int, *, dtype: Dtype, name: str) -> jnp.ndarray:
    """Linear layer with PyTorch init; called inside a compact method."""
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=torch_kernel_init,
                    bias_init=torch_bias_init(x.shape[-1]), name=name)(x)


# --------------------------------------------------------------------------------------------
# Normalisation layers
# --------------------------------------------------------------------------------------------

class InstanceNorm(nn.Module):
    """``GroupNorm(C, C)`` of PyTorch: per-sample, per-channel normalisation over H and W.

    Statistics are computed in float32 (two-pass variance, biased), then a learnable per-channel
    scale (init 1) and shift (init 0) are applied. Input and output are ``(N, H, W, C)``.
    """
    epsilon: float = _EPS
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return instance_norm(x.astype(jnp.float32), scale, bias, self.epsilon).astype(self.dtype)


def _instance_stats(x, epsilon):
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=(1, 2), keepdims=True)
    return mean, lax.rsqrt(var + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def instance_norm(x, scale, bias, epsilon=_EPS):
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


class BatchNorm(nn.Module):
    """PyTorch ``BatchNorm2d``/``BatchNorm1d`` over all axes but the last (channels).

    ``train=True``: normalise with the batch mean and *biased* batch variance, and (outside
    ``init``) update ``batch_stats`` as ``running = (1 - momentum) * running + momentum * batch``
    with the *unbiased* variance ``var * n / (n - 1)``, where ``n`` counts the valid elements per
    channel (valid rows x H x W). ``train=False``: normalise with the running averages.

    ``mask`` (N,) bool, optional, train mode only: rows with False take no part in the
    statistics (they are still normalised, with the statistics of the valid rows). Flax's own
    ``nn.BatchNorm`` is not used because it updates the running variance with the biased
    variance; this layer implements the PyTorch rule, including with a mask.

    Attributes:
      momentum: PyTorch convention, the weight of the new batch statistic (0.1); Flax's
        ``nn.BatchNorm(momentum=0.9)`` is the same decay.
      epsilon: added to the variance (1e-5).
    """
    momentum: float = 0.1
    epsilon: float = _EPS
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False,
                 mask: Optional[jnp.ndarray] = None) -> jnp.ndarray:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        xf = x.astype(jnp.float32)
        axes = tuple(range(x.ndim - 1))
        if train:
            per_row = math.prod(x.shape[1:-1])
            if mask is None:
                count = float(x.shape[0] * per_row)
                mean = jnp.mean(xf, axis=axes)
                var = jnp.mean(jnp.square(xf - mean), axis=axes)
            else:
                if mask.shape != (x.shape[0],):
                    raise ValueError(f"mask must have shape ({x.shape[0]},) (one flag per row), "
                                     f"got {mask.shape}")
                w = mask.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
                count = jnp.sum(w) * per_row
                # An all-padding batch would divide by zero; its statistics are meaningless.
                denom = jnp.maximum(count, 1.0)
                mean = jnp.sum(xf * w, axis=axes) / denom
                var = jnp.sum(jnp.square(xf - mean) * w, axis=axes) / denom
            if not self.is_initializing():
                unbiased = var * (count / jnp.maximum(count - 1.0, 1.0))
                m = self.momentum
                ra_mean.value = (1.0 - m) * ra_mean.value + m * mean
                ra_var.value = (1.0 - m) * ra_var.value + m * unbiased
        else:
            mean, var = ra_mean.value, ra_var.value
        y = (xf - mean) * (lax.rsqrt(var + self.epsilon) * scale) + bias
        return y.astype(self.dtype)


def _normalise(kind: str, x: jnp.ndarray, *, train: bool, mask: Optional[jnp.ndarray],
               dtype: Dtype, name: str) -> jnp.ndarray:
    """Applies the DC norm ``kind`` to NHWC ``x``; called inside a compact method."""
    if kind == "none":
        return x
    if kind == "instancenorm":
        return InstanceNorm(dtype=dtype, name=name)(x)
    if kind == "batchnorm":
        return BatchNorm(dtype=dtype, name=name)(x, train=train, mask=mask)
    if kind == "layernorm":
        # PyTorch LayerNorm([C, H, W]): statistics and elementwise affine over the whole map.
        return nn.LayerNorm(epsilon=_EPS, reduction_axes=(-3, -2, -1), feature_axes=(-3, -2, -1),
                            use_fast_variance=False, dtype=dtype, name=name)(x)
    if kind == "groupnorm":
        return nn.GroupNorm(num_groups=4, epsilon=_EPS, use_fast_variance=False, dtype=dtype,
                            name=name)(x)
    raise ValueError(f"unknown norm {kind!r}; use one of {NORMS}")


def _leaky_relu(x):
    return nn.leaky_relu(x, negative_slope=0.01)


_ACT_FNS = {"relu": nn.relu, "sigmoid": nn.sigmoid, "leakyrelu": _leaky_relu, "swish": nn.swish}


def _pool2(kind: str, x: jnp.ndarray) -> jnp.ndarray:
    """2x2 stride-2 pooling that floors odd sizes (7 -> 3) like PyTorch."""
    if kind == "none":
        return x
    if x.shape[1] < 2 or x.shape[2] < 2:
        raise ValueError(f"feature map {x.shape[1]}x{x.shape[2]} is too small for 2x2 pooling; "
                         "use a larger input image or a shallower network")
    if kind == "avgpool":
        # The mean of each 2x2 block through a reshape: its gradient is a broadcast that fuses
        # with its neighbours, where reduce_window's is a padded scatter. On CPU, forward and
        # backward of the first ConvNet pooling (256 images, chunks of 16): 38 ms against 54.
        # Odd sizes drop the last row/column first, as PyTorch does.
        n, h, w, c = x.shape
        x = x[:, : h - h % 2, : w - w % 2]
        return jnp.mean(x.reshape(n, h // 2, 2, w // 2, 2, c), axis=(2, 4))
    if kind == "maxpool":
        return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    raise ValueError(f"unknown pooling {kind!r}; use one of {POOLINGS}")


def _check_input(x: jnp.ndarray) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected an NHWC image batch (N, H, W, C), got shape {x.shape}")


def _check_choice(what: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; use one of {tuple(allowed)}")


def _outputs(features: jnp.ndarray, num_classes: int, dtype: Dtype):
    """Flattens NHWC features to the embedding and applies the linear classifier."""
    embedding = features.reshape(features.shape[0], -1)
    logits = _dense(embedding, num_classes, dtype=dtype, name="classifier")
    return embedding.astype(jnp.float32), logits.astype(jnp.float32)


# --------------------------------------------------------------------------------------------
# ConvNet family
# --------------------------------------------------------------------------------------------

class _ChoosesNorm:
    """Shared by the networks with a ``norm`` field: checks it at construction (before any
    tracing, so a typo fails at once) and tells whether the network keeps running statistics.

    A subclass adds checks of its own fields in ``_check_fields``.
    """

    def __post_init__(self):
        _check_choice("norm", self.norm, NORMS)
        self._check_fields()
        super().__post_init__()

    def _check_fields(self) -> None:
        pass

    @property
    def uses_batch_stats(self) -> bool:
        return self.norm == "batchnorm"


class ConvNet(_ChoosesNorm, nn.Module):
    """DC ConvNet: ``depth`` x [conv3x3(width) -> norm -> act -> pool2], flatten, linear.

    The default (width 128, depth 3, instance norm, ReLU, avg-pool) is IDM's 'ConvNet'; depth 6
    at 224x224 is 'ConvNet_6' (224 -> 112 -> 56 -> 28 -> 14 -> 7 -> 3, embedding 1152).

    Call: ``(x (N,H,W,C), train=False, mask=None) -> (embedding (N, D) f32, logits (N, K) f32)``,
    with ``D = width * H_out * W_out``.
    """
    num_classes: int
    width: int = 128
    depth: int = 3
    norm: str = "instancenorm"
    act: str = "relu"
    pool: str = "avgpool"
    dtype: Dtype = jnp.float32

    def _check_fields(self) -> None:
        _check_choice("activation", self.act, ACTIVATIONS)
        _check_choice("pooling", self.pool, POOLINGS)
        if self.depth < 1 or self.width < 1 or self.num_classes < 1:
            raise ValueError("ConvNet needs depth >= 1, width >= 1 and num_classes >= 1, got "
                             f"depth={self.depth}, width={self.width}, "
                             f"num_classes={self.num_classes}")

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, mask: Optional[jnp.ndarray] = None):
        _check_input(x)
        one_channel = x.shape[-1] == 1
        x = x.astype(self.dtype)
        act = _ACT_FNS[self.act]
        for d in range(self.depth):
            # DC pads a 1-channel (28x28) input by 3 so the stack sees 32x32 maps.
            pad = 3 if (one_channel and d == 0) else 1
            x = _conv(x, self.width, 3, padding=pad, dtype=self.dtype, name=f"conv_{d}")
            x = _normalise(self.norm, x, train=train, mask=mask, dtype=self.dtype,
                           name=f"norm_{d}")
            x = act(x)
            x = _pool2(self.pool, x)
        return _outputs(x, self.num_classes, self.dtype)


# --------------------------------------------------------------------------------------------
# Cross-architecture models (DC versions for 32x32)
# --------------------------------------------------------------------------------------------

# (out_channels, kernel, padding, pool_after)
_ALEXNET_LAYERS = ((128, 5, 2, True), (192, 5, 2, True), (256, 3, 1, False),
                   (192, 3, 1, False), (192, 3, 1, True))


class AlexNet(_ChoosesNorm, nn.Module):
    """DC AlexNet: five convs (128-192-256-192-192) with ReLU and three max-pools, then linear.

    ``norm='batchnorm'`` gives DC's 'AlexNetBN' (BatchNorm after every conv). Embedding is
    192 * 4 * 4 = 3072 at 32x32 (and at 28x28x1, where the first conv pads by 4).
    Call: ``(x, train=False, mask=None) -> (embedding (N, D), logits (N, K))``.
    """
    num_classes: int
    norm: str = "none"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, mask: Optional[jnp.ndarray] = None):
        _check_input(x)
        one_channel = x.shape[-1] == 1
        x = x.astype(self.dtype)
        for i, (features, kernel, pad, pool_after) in enumerate(_ALEXNET_LAYERS):
            if i == 0 and one_channel:
                pad = 4
            x = _conv(x, features, kernel, padding=pad, dtype=self.dtype, name=f"conv_{i}")
            x = _normalise(self.norm, x, train=train, mask=mask, dtype=self.dtype,
                           name=f"norm_{i}")
            x = nn.relu(x)
            if pool_after:
                x = _pool2("maxpool", x)
        return _outputs(x, self.num_classes, self.dtype)


_VGG11_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(_ChoosesNorm, nn.Module):
    """DC VGG11: cfg 64,M,128,M,256,256,M,512,512,M,512,512,M; conv3x3 -> norm -> ReLU.

    ``norm`` is instance norm by default ('VGG11'); ``'batchnorm'`` gives 'VGG11BN'. DC's trailing
    AvgPool(1) is the identity and is omitted. Embedding 512 at 32x32 (and 28x28x1, where the
    first conv pads by 3). Call: ``(x, train=False, mask=None) -> (embedding, logits)``.
    """
    num_classes: int
    norm: str = "instancenorm"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, mask: Optional[jnp.ndarray] = None):
        _check_input(x)
        one_channel = x.shape[-1] == 1
        x = x.astype(self.dtype)
        conv_index = 0
        for i, item in enumerate(_VGG11_CFG):
            if item == "M":
                x = _pool2("maxpool", x)
                continue
            pad = 3 if (one_channel and i == 0) else 1
            x = _conv(x, item, 3, padding=pad, dtype=self.dtype, name=f"conv_{conv_index}")
            x = _normalise(self.norm, x, train=train, mask=mask, dtype=self.dtype,
                           name=f"norm_{conv_index}")
            x = nn.relu(x)
            conv_index += 1
        return _outputs(x, self.num_classes, self.dtype)


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3(s)-norm-ReLU-conv3x3-norm + shortcut, then ReLU.

    ``downsample='stride'`` strides the first conv and the 1x1 shortcut conv (DC 'ResNet18');
    ``'avgpool'`` keeps every conv at stride 1 and downsamples with 2x2 average pooling after the
    first conv's ReLU and after the shortcut conv (DC 'ResNet18_AP'). Convs have no bias.
    """
    features: int
    stride: int = 1
    norm: str = "instancenorm"
    downsample: str = "stride"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, mask: Optional[jnp.ndarray] = None):
        strided = self.downsample == "stride"
        conv_stride = self.stride if strided else 1
        y = _conv(x, self.features, 3, padding=1, stride=conv_stride, use_bias=False,
                  dtype=self.dtype, name="conv1")
        y = nn.relu(_normalise(self.norm, y, train=train, mask=mask, dtype=self.dtype,
                               name="norm1"))
        if not strided and self.stride != 1:
            y = nn.avg_pool(y, (2, 2), strides=(2, 2), padding="VALID")
        y = _conv(y, self.features, 3, padding=1, use_bias=False, dtype=self.dtype, name="conv2")
        y = _normalise(self.norm, y, train=train, mask=mask, dtype=self.dtype, name="norm2")
        if self.stride != 1 or x.shape[-1] != self.features:
            s = _conv(x, self.features, 1, padding=0, stride=conv_stride, use_bias=False,
                      dtype=self.dtype, name="shortcut_conv")
            if not strided and self.stride != 1:
                s = nn.avg_pool(s, (2, 2), strides=(2, 2), padding="VALID")
            s = _normalise(self.norm, s, train=train, mask=mask, dtype=self.dtype,
                           name="shortcut_norm")
        else:
            s = x
        return nn.relu(y + s)


class ResNet18(_ChoosesNorm, nn.Module):
    """DC ResNet18 for small images: stem conv3x3(64, no bias)-norm-ReLU (no max-pool), four
    stages of two BasicBlocks (64/128/256/512, strides 1/2/2/2), then linear.

    * ``downsample='stride'`` ('ResNet18', 'ResNet18BN'): a final 4x4 average pool
      (stride 4, floor), so the embedding is 512 at 28/32 px and 512*2*2 = 2048 at 64 px
      (DC's PyTorch Linear(512) would reject 64 px; here the classifier adapts).
    * ``downsample='avgpool'`` ('ResNet18_AP', 'ResNet18BN_AP'): no final pooling, embedding
      512 * 4 * 4 = 8192 at 32 px, 512 * 3 * 3 at 28 px.

    ``norm`` is instance norm ('ResNet18') or ``'batchnorm'`` ('ResNet18BN').
    Call: ``(x, train=False, mask=None) -> (embedding, logits)``.
    """
    num_classes: int
    norm: str = "instancenorm"
    downsample: str = "stride"
    dtype: Dtype = jnp.float32

    def _check_fields(self) -> None:
        _check_choice("downsample", self.downsample, ("stride", "avgpool"))

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, mask: Optional[jnp.ndarray] = None):
        _check_input(x)
        x = x.astype(self.dtype)
        x = _conv(x, 64, 3, padding=1, use_bias=False, dtype=self.dtype, name="stem_conv")
        x = nn.relu(_normalise(self.norm, x, train=train, mask=mask, dtype=self.dtype,
                               name="stem_norm"))
        for stage, (features, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2))):
            for b in range(2):
                if self.downsample == "avgpool" and b == 0 and stride != 1 and (
                        x.shape[1] < 2 or x.shape[2] < 2):
                    raise ValueError(f"feature map {x.shape[1]}x{x.shape[2]} is too small for "
                                     "ResNet18_AP; use a larger input image")
                x = BasicBlock(features=features, stride=stride if b == 0 else 1,
                               norm=self.norm, downsample=self.downsample, dtype=self.dtype,
                               name=f"layer{stage + 1}_block{b}")(x, train=train, mask=mask)
        if self.downsample == "stride":
            if x.shape[1] < 4 or x.shape[2] < 4:
                raise ValueError(f"ResNet18 ends with a 4x4 average pool but the final feature "
                                 f"map is {x.shape[1]}x{x.shape[2]}; use inputs of at least "
                                 "25x25 pixels")
            x = nn.avg_pool(x, (4, 4), strides=(4, 4), padding="VALID")
        return _outputs(x, self.num_classes, self.dtype)


class LeNet(nn.Module):
    """DC LeNet: conv5x5(6)-ReLU-maxpool, conv5x5(16)-ReLU-maxpool, fc 120-ReLU, fc 84-ReLU, fc.

    The first conv pads by 2 for 1-channel (28x28) input and by 0 otherwise, so the conv stack
    ends at 16x5x5 for both. The embedding is the input of the last linear layer (84 features,
    after ReLU). Call: ``(x, train=False, mask=None) -> (embedding (N, 84), logits)``.
    """
    num_classes: int
    dtype: Dtype = jnp.float32

    uses_batch_stats = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, mask: Optional[jnp.ndarray] = None):
        _check_input(x)
        pad = 2 if x.shape[-1] == 1 else 0
        x = x.astype(self.dtype)
        x = _pool2("maxpool", nn.relu(_conv(x, 6, 5, padding=pad, dtype=self.dtype,
                                            name="conv_0")))
        x = _pool2("maxpool", nn.relu(_conv(x, 16, 5, padding=0, dtype=self.dtype,
                                            name="conv_1")))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(_dense(x, 120, dtype=self.dtype, name="fc_1"))
        x = nn.relu(_dense(x, 84, dtype=self.dtype, name="fc_2"))
        return _outputs(x, self.num_classes, self.dtype)


class MLP(nn.Module):
    """DC MLP: flatten, fc 128-ReLU, fc 128-ReLU, fc. The embedding is the 128-d input of the
    last linear layer. Call: ``(x, train=False, mask=None) -> (embedding (N, 128), logits)``.
    """
    num_classes: int
    dtype: Dtype = jnp.float32

    uses_batch_stats = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, mask: Optional[jnp.ndarray] = None):
        _check_input(x)
        x = x.astype(self.dtype).reshape(x.shape[0], -1)
        x = nn.relu(_dense(x, 128, dtype=self.dtype, name="fc_1"))
        x = nn.relu(_dense(x, 128, dtype=self.dtype, name="fc_2"))
        return _outputs(x, self.num_classes, self.dtype)


def AlexNetBN(num_classes: int, dtype: Dtype = jnp.float32) -> AlexNet:
    """DC 'AlexNetBN': AlexNet with BatchNorm after every conv."""
    return AlexNet(num_classes, norm="batchnorm", dtype=dtype)


def VGG11BN(num_classes: int, dtype: Dtype = jnp.float32) -> VGG11:
    """DC 'VGG11BN': VGG11 with BatchNorm instead of instance norm."""
    return VGG11(num_classes, norm="batchnorm", dtype=dtype)


def ResNet18BN(num_classes: int, dtype: Dtype = jnp.float32) -> ResNet18:
    """DC 'ResNet18BN': ResNet18 with BatchNorm."""
    return ResNet18(num_classes, norm="batchnorm", dtype=dtype)


def ResNet18_AP(num_classes: int, dtype: Dtype = jnp.float32) -> ResNet18:
    """DC 'ResNet18_AP': strided convs replaced by stride-1 convs + 2x2 average pooling."""
    return ResNet18(num_classes, downsample="avgpool", dtype=dtype)


def ResNet18BN_AP(num_classes: int, dtype: Dtype = jnp.float32) -> ResNet18:
    """DC 'ResNet18BN_AP': ResNet18_AP with BatchNorm."""
    return ResNet18(num_classes, norm="batchnorm", downsample="avgpool", dtype=dtype)


# --------------------------------------------------------------------------------------------
# Registry by DC/DM/IDM model name
# --------------------------------------------------------------------------------------------

def _convnet(**overrides):
    return lambda num_classes, dtype: ConvNet(num_classes, dtype=dtype, **overrides)


# Settings follow DC/IDM ``get_network``: every ConvNet variant starts from width 128, depth 3,
# instance norm, ReLU, avg-pool and changes one thing.
_REGISTRY: dict = {
    "ConvNet": _convnet(),
    "ConvNetD1": _convnet(depth=1),
    "ConvNetD2": _convnet(depth=2),
    "ConvNetD3": _convnet(depth=3),
    "ConvNetD4": _convnet(depth=4),
    "ConvNet_4": _convnet(depth=4),
    "ConvNet_5": _convnet(depth=5),
    "ConvNet_6": _convnet(depth=6),
    "ConvNetW32": _convnet(width=32),
    "ConvNetW64": _convnet(width=64),
    "ConvNetW128": _convnet(width=128),
    "ConvNetW256": _convnet(width=256),
    "ConvNetAS": _convnet(act="sigmoid"),
    "ConvNetAR": _convnet(act="relu"),
    "ConvNetAL": _convnet(act="leakyrelu"),
    "ConvNetASwish": _convnet(act="swish"),
    "ConvNetASwishBN": _convnet(act="swish", norm="batchnorm"),
    "ConvNetNN": _convnet(norm="none"),
    "ConvNetBN": _convnet(norm="batchnorm"),
    "ConvNetLN": _convnet(norm="layernorm"),
    "ConvNetIN": _convnet(norm="instancenorm"),
    "ConvNetGN": _convnet(norm="groupnorm"),
    "ConvNetNP": _convnet(pool="none"),
    "ConvNetMP": _convnet(pool="maxpool"),
    "ConvNetAP": _convnet(pool="avgpool"),
    "ConvNet_BN": _convnet(norm="batchnorm"),
    "AlexNet": lambda k, dtype: AlexNet(k, dtype=dtype),
    "AlexNetBN": AlexNetBN,
    "VGG11": lambda k, dtype: VGG11(k, dtype=dtype),
    "VGG11BN": VGG11BN,
    "ResNet18": lambda k, dtype: ResNet18(k, dtype=dtype),
    "ResNet18BN": ResNet18BN,
    "ResNet18_AP": ResNet18_AP,
    "ResNet18BN_AP": ResNet18BN_AP,
    "LeNet": lambda k, dtype: LeNet(k, dtype=dtype),
    "MLP": lambda k, dtype: MLP(k, dtype=dtype),
}

MODEL_NAMES: tuple = tuple(_REGISTRY)


def get_model(name: str, num_classes: int, in_channels: int = 3,
              dtype: Dtype = jnp.float32) -> nn.Module:
    """Builds a network by its DC/DM/IDM name (e.g. 'ConvNet', 'ConvNet_6', 'ResNet18BN').

    Args:
      name: one of ``MODEL_NAMES``.
      num_classes: number of logits K (>= 1).
      in_channels: image channels C (>= 1). Kept for parity with DC's ``get_network``; the
        modules read C from their input (1-channel inputs get DC's wider first padding).
      dtype: compute dtype; parameters stay float32.
    Returns:
      an unbound Flax module; ``module.apply(variables, x (N,H,W,C), train=..., mask=...)``
      returns ``(embedding (N, D) f32, logits (N, K) f32)``.
    Raises:
      ValueError: unknown name (the message lists the valid names) or bad sizes.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if int(in_channels) < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    return _REGISTRY[name](int(num_classes), dtype)


def uses_batch_stats(name_or_module) -> bool:
    """True when the model has BatchNorm, i.e. a ``batch_stats`` collection to carry and update.

    Args:
      name_or_module: a name in ``MODEL_NAMES`` or a module from this file.
    """
    if isinstance(name_or_module, str):
        return get_model(name_or_module, num_classes=1).uses_batch_stats
    flag = getattr(name_or_module, "uses_batch_stats", None)
    if not isinstance(flag, bool):
        raise ValueError(f"{type(name_or_module).__name__} is not a model of idm_jax.models; "
                         "pass a model name or a module built by get_model")
    return flag


def init_variables(model: nn.Module, key: jax.Array, image_shape) -> dict:
    """Initialises ``model`` for images of shape ``image_shape = (H, W, C)``.

    The whole initialisation is one jitted program, cached per (model, image_shape): modules are
    hashable dataclasses, so initialising another model of the same architecture (a new queue
    model, a new evaluation model) reuses the compiled program. Eager initialisation would
    compile one random-number kernel per parameter shape instead. The dummy forward pass inside
    ``init`` does not reach the outputs and is dropped by the compiler. To initialise many models
    at once, ``jax.vmap`` this function over keys.

    Args:
      model: a module of this file (or any module taking ``(x, train=...)``).
      key: PRNG key.
      image_shape: ``(H, W, C)`` of one image.
    Returns:
      ``{'params': ...}`` plus ``'batch_stats'`` (running mean 0, running var 1) for BatchNorm
      models. All leaves float32.
    """
    image_shape = tuple(int(s) for s in image_shape)
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise ValueError(f"image_shape must be (H, W, C) with positive sizes, got {image_shape}")
    variables = _jit_init(model, key, image_shape)
    return {k: v for k, v in variables.items()}


@functools.partial(jax.jit, static_argnums=(0, 2))
def _jit_init(model: nn.Module, key: jax.Array, image_shape: tuple):
    return model.init(key, jnp.zeros((1,) + image_shape, jnp.float32), train=False)


def count_params(params) -> int:
    """Number of scalars in a parameter pytree (arrays or ``jax.ShapeDtypeStruct`` leaves).

    Pass ``variables['params']`` to get PyTorch's ``sum(p.numel() for p in parameters())``;
    BatchNorm running statistics are buffers, not parameters.
    """
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))
