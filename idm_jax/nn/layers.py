"""The layers the networks are built from: PyTorch initialisers, conv and dense layers, the
normalisations of DC (instance, batch, layer, group), activations and pooling.

Conventions (NHWC, PyTorch's default initialisation, float32 parameters and statistics with an
optional compute ``dtype``) are those of ``idm_jax.nn.models``, which documents them.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from idm_jax.accel import ops

Dtype = Any

NORMS = ("instancenorm", "batchnorm", "layernorm", "groupnorm", "none")
ACTIVATIONS = ("relu", "sigmoid", "leakyrelu", "swish")
POOLINGS = ("avgpool", "maxpool", "none")

EPS = ops.EPS

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


def conv(x: jnp.ndarray, features: int, kernel: int, *, padding: int, stride: int = 1,
         use_bias: bool = True, dtype: Dtype, name: str,
         conv_op: Callable = lax.conv_general_dilated) -> jnp.ndarray:
    """Square conv with PyTorch init and symmetric zero padding; called inside a compact method.

    ``conv_op`` is the convolution primitive, with ``lax.conv_general_dilated``'s signature: the
    engine passes ``ops.conv2d`` on CPU (same values, faster gradients; ``backend.Policy``).
    """
    fan_in = kernel * kernel * x.shape[-1]
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((padding, padding), (padding, padding)), use_bias=use_bias,
                   dtype=dtype, param_dtype=jnp.float32, kernel_init=torch_kernel_init,
                   bias_init=torch_bias_init(fan_in),
                   conv_general_dilated=conv_op,
                   name=name)(x)


def dense(x: jnp.ndarray, features: int, *, dtype: Dtype, name: str) -> jnp.ndarray:
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
    epsilon: float = EPS
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        y = ops.instance_norm(x.astype(jnp.float32), scale, bias, self.epsilon)
        return y.astype(self.dtype)


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
    epsilon: float = EPS
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


def normalise(kind: str, x: jnp.ndarray, *, train: bool, mask: Optional[jnp.ndarray],
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
        return nn.LayerNorm(epsilon=EPS, reduction_axes=(-3, -2, -1), feature_axes=(-3, -2, -1),
                            use_fast_variance=False, dtype=dtype, name=name)(x)
    if kind == "groupnorm":
        return nn.GroupNorm(num_groups=4, epsilon=EPS, use_fast_variance=False, dtype=dtype,
                            name=name)(x)
    raise ValueError(f"unknown norm {kind!r}; use one of {NORMS}")


def _leaky_relu(x):
    return nn.leaky_relu(x, negative_slope=0.01)


ACT_FNS = {"relu": nn.relu, "sigmoid": nn.sigmoid, "leakyrelu": _leaky_relu, "swish": nn.swish}


def pool2(kind: str, x: jnp.ndarray) -> jnp.ndarray:
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


def check_input(x: jnp.ndarray) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected an NHWC image batch (N, H, W, C), got shape {x.shape}")


def check_choice(what: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; use one of {tuple(allowed)}")


def outputs(features: jnp.ndarray, num_classes: int, dtype: Dtype):
    """Flattens NHWC features to the embedding and applies the linear classifier."""
    embedding = features.reshape(features.shape[0], -1)
    logits = dense(embedding, num_classes, dtype=dtype, name="classifier")
    return embedding.astype(jnp.float32), logits.astype(jnp.float32)


class ChoosesNorm:
    """Shared by the networks with a ``norm`` field: checks it at construction (before any
    tracing, so a typo fails at once) and tells whether the network keeps running statistics.

    A subclass adds checks of its own fields in ``_check_fields``.
    """

    def __post_init__(self):
        check_choice("norm", self.norm, NORMS)
        self._check_fields()
        super().__post_init__()

    def _check_fields(self) -> None:
        pass

    @property
    def uses_batch_stats(self) -> bool:
        return self.norm == "batchnorm"


__all__ = ["NORMS", "ACTIVATIONS", "POOLINGS", "EPS", "torch_kernel_init", "torch_bias_init",
           "conv", "dense", "InstanceNorm", "BatchNorm", "normalise", "ACT_FNS", "pool2",
           "check_input", "check_choice", "outputs", "ChoosesNorm"]
