"""Networks of DC/DM/IDM (``dc_networks.py``) as Flax linen modules over NHWC images.

IDM matches feature means of a ConvNet: the *embedding* is exactly the input of the final linear
classifier (the flattened feature map), and the class-aware regulariser needs the logits of the
same forward pass. Every module here therefore returns ``(embedding, logits)`` from one call.

Conventions (docs/FAITHFULNESS.md, "networks"):

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
* ``conv_op`` (every network with convolutions) is the convolution primitive, a building block
  passed in: ``lax.conv_general_dilated`` by default, ``idm_jax.accel.ops.conv2d`` (the same values
  with gradients that are faster on CPU) where the engine's backend policy says so.
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

from idm_jax.nn import layers as L
from idm_jax.nn.resnet import BasicBlock, ResNet18, ResNet18BN, ResNet18BN_AP, ResNet18_AP

Dtype = Any
NORMS, ACTIVATIONS, POOLINGS = L.NORMS, L.ACTIVATIONS, L.POOLINGS

# --------------------------------------------------------------------------------------------
# ConvNet family
# --------------------------------------------------------------------------------------------

class ConvNet(L.ChoosesNorm, nn.Module):
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
    conv_op: Callable = lax.conv_general_dilated   # the convolution (backend.Policy.conv_op)

    def _check_fields(self) -> None:
        L.check_choice("activation", self.act, L.ACTIVATIONS)
        L.check_choice("pooling", self.pool, L.POOLINGS)
        if self.depth < 1 or self.width < 1 or self.num_classes < 1:
            raise ValueError("ConvNet needs depth >= 1, width >= 1 and num_classes >= 1, got "
                             f"depth={self.depth}, width={self.width}, "
                             f"num_classes={self.num_classes}")

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, mask: Optional[jnp.ndarray] = None):
        L.check_input(x)
        one_channel = x.shape[-1] == 1
        x = x.astype(self.dtype)
        act = L.ACT_FNS[self.act]
        for d in range(self.depth):
            # DC pads a 1-channel (28x28) input by 3 so the stack sees 32x32 maps.
            pad = 3 if (one_channel and d == 0) else 1
            x = L.conv(x, self.width, 3, padding=pad, dtype=self.dtype,
                       name=f"conv_{d}", conv_op=self.conv_op)
            x = L.normalise(self.norm, x, train=train, mask=mask, dtype=self.dtype,
                           name=f"norm_{d}")
            x = act(x)
            x = L.pool2(self.pool, x)
        return L.outputs(x, self.num_classes, self.dtype)


# --------------------------------------------------------------------------------------------
# Cross-architecture models (DC versions for 32x32)
# --------------------------------------------------------------------------------------------

# (out_channels, kernel, padding, pool_after)
_ALEXNET_LAYERS = ((128, 5, 2, True), (192, 5, 2, True), (256, 3, 1, False),
                   (192, 3, 1, False), (192, 3, 1, True))


class AlexNet(L.ChoosesNorm, nn.Module):
    """DC AlexNet: five convs (128-192-256-192-192) with ReLU and three max-pools, then linear.

    ``norm='batchnorm'`` gives DC's 'AlexNetBN' (BatchNorm after every conv). Embedding is
    192 * 4 * 4 = 3072 at 32x32 (and at 28x28x1, where the first conv pads by 4).
    Call: ``(x, train=False, mask=None) -> (embedding (N, D), logits (N, K))``.
    """
    num_classes: int
    norm: str = "none"
    dtype: Dtype = jnp.float32
    conv_op: Callable = lax.conv_general_dilated   # the convolution (backend.Policy.conv_op)

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, mask: Optional[jnp.ndarray] = None):
        L.check_input(x)
        one_channel = x.shape[-1] == 1
        x = x.astype(self.dtype)
        for i, (features, kernel, pad, pool_after) in enumerate(_ALEXNET_LAYERS):
            if i == 0 and one_channel:
                pad = 4
            x = L.conv(x, features, kernel, padding=pad, dtype=self.dtype,
                       name=f"conv_{i}", conv_op=self.conv_op)
            x = L.normalise(self.norm, x, train=train, mask=mask, dtype=self.dtype,
                           name=f"norm_{i}")
            x = nn.relu(x)
            if pool_after:
                x = L.pool2("maxpool", x)
        return L.outputs(x, self.num_classes, self.dtype)


_VGG11_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(L.ChoosesNorm, nn.Module):
    """DC VGG11: cfg 64,M,128,M,256,256,M,512,512,M,512,512,M; conv3x3 -> norm -> ReLU.

    ``norm`` is instance norm by default ('VGG11'); ``'batchnorm'`` gives 'VGG11BN'. DC's trailing
    AvgPool(1) is the identity and is omitted. Embedding 512 at 32x32 (and 28x28x1, where the
    first conv pads by 3). Call: ``(x, train=False, mask=None) -> (embedding, logits)``.
    """
    num_classes: int
    norm: str = "instancenorm"
    dtype: Dtype = jnp.float32
    conv_op: Callable = lax.conv_general_dilated   # the convolution (backend.Policy.conv_op)

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, mask: Optional[jnp.ndarray] = None):
        L.check_input(x)
        one_channel = x.shape[-1] == 1
        x = x.astype(self.dtype)
        conv_index = 0
        for i, item in enumerate(_VGG11_CFG):
            if item == "M":
                x = L.pool2("maxpool", x)
                continue
            pad = 3 if (one_channel and i == 0) else 1
            x = L.conv(x, item, 3, padding=pad, dtype=self.dtype,
                       name=f"conv_{conv_index}", conv_op=self.conv_op)
            x = L.normalise(self.norm, x, train=train, mask=mask, dtype=self.dtype,
                           name=f"norm_{conv_index}")
            x = nn.relu(x)
            conv_index += 1
        return L.outputs(x, self.num_classes, self.dtype)


class LeNet(nn.Module):
    """DC LeNet: conv5x5(6)-ReLU-maxpool, conv5x5(16)-ReLU-maxpool, fc 120-ReLU, fc 84-ReLU, fc.

    The first conv pads by 2 for 1-channel (28x28) input and by 0 otherwise, so the conv stack
    ends at 16x5x5 for both. The embedding is the input of the last linear layer (84 features,
    after ReLU). Call: ``(x, train=False, mask=None) -> (embedding (N, 84), logits)``.
    """
    num_classes: int
    dtype: Dtype = jnp.float32
    conv_op: Callable = lax.conv_general_dilated   # the convolution (backend.Policy.conv_op)

    uses_batch_stats = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, mask: Optional[jnp.ndarray] = None):
        L.check_input(x)
        pad = 2 if x.shape[-1] == 1 else 0
        x = x.astype(self.dtype)
        x = L.pool2("maxpool", nn.relu(L.conv(x, 6, 5, padding=pad, dtype=self.dtype,
                                            name="conv_0", conv_op=self.conv_op)))
        x = L.pool2("maxpool", nn.relu(L.conv(x, 16, 5, padding=0, dtype=self.dtype,
                                            name="conv_1", conv_op=self.conv_op)))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(L.dense(x, 120, dtype=self.dtype, name="fc_1"))
        x = nn.relu(L.dense(x, 84, dtype=self.dtype, name="fc_2"))
        return L.outputs(x, self.num_classes, self.dtype)


class MLP(nn.Module):
    """DC MLP: flatten, fc 128-ReLU, fc 128-ReLU, fc. The embedding is the 128-d input of the
    last linear layer. Call: ``(x, train=False, mask=None) -> (embedding (N, 128), logits)``.
    """
    num_classes: int
    dtype: Dtype = jnp.float32

    uses_batch_stats = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, mask: Optional[jnp.ndarray] = None):
        L.check_input(x)
        x = x.astype(self.dtype).reshape(x.shape[0], -1)
        x = nn.relu(L.dense(x, 128, dtype=self.dtype, name="fc_1"))
        x = nn.relu(L.dense(x, 128, dtype=self.dtype, name="fc_2"))
        return L.outputs(x, self.num_classes, self.dtype)


def AlexNetBN(num_classes: int, dtype: Dtype = jnp.float32,
              conv_op: Callable = lax.conv_general_dilated) -> AlexNet:
    """DC 'AlexNetBN': AlexNet with BatchNorm after every conv."""
    return AlexNet(num_classes, norm="batchnorm", dtype=dtype, conv_op=conv_op)


def VGG11BN(num_classes: int, dtype: Dtype = jnp.float32,
            conv_op: Callable = lax.conv_general_dilated) -> VGG11:
    """DC 'VGG11BN': VGG11 with BatchNorm instead of instance norm."""
    return VGG11(num_classes, norm="batchnorm", dtype=dtype, conv_op=conv_op)


# --------------------------------------------------------------------------------------------
# Registry by DC/DM/IDM model name
# --------------------------------------------------------------------------------------------

def _convnet(**overrides):
    return lambda num_classes, dtype, conv: ConvNet(num_classes, dtype=dtype, conv_op=conv,
                                                   **overrides)


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
    "AlexNet": lambda k, dtype, conv: AlexNet(k, dtype=dtype, conv_op=conv),
    "AlexNetBN": AlexNetBN,
    "VGG11": lambda k, dtype, conv: VGG11(k, dtype=dtype, conv_op=conv),
    "VGG11BN": VGG11BN,
    "ResNet18": lambda k, dtype, conv: ResNet18(k, dtype=dtype, conv_op=conv),
    "ResNet18BN": ResNet18BN,
    "ResNet18_AP": ResNet18_AP,
    "ResNet18BN_AP": ResNet18BN_AP,
    "LeNet": lambda k, dtype, conv: LeNet(k, dtype=dtype, conv_op=conv),
    "MLP": lambda k, dtype, conv: MLP(k, dtype=dtype),
}

MODEL_NAMES: tuple = tuple(_REGISTRY)


def get_model(name: str, num_classes: int, in_channels: int = 3,
              dtype: Dtype = jnp.float32,
              conv_op: Callable = lax.conv_general_dilated) -> nn.Module:
    """Builds a network by its DC/DM/IDM name (e.g. 'ConvNet', 'ConvNet_6', 'ResNet18BN').

    Args:
      name: one of ``MODEL_NAMES``.
      num_classes: number of logits K (>= 1).
      in_channels: image channels C (>= 1). Kept for parity with DC's ``get_network``; the
        modules read C from their input (1-channel inputs get DC's wider first padding).
      dtype: compute dtype; parameters stay float32.
      conv_op: the convolution, with ``lax.conv_general_dilated``'s signature (the default);
        ``backend.Policy.conv_op`` is the device's choice (``ops.conv2d`` on CPU).
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
    return _REGISTRY[name](int(num_classes), dtype, conv_op)


def uses_batch_stats(name_or_module) -> bool:
    """True when the model has BatchNorm, i.e. a ``batch_stats`` collection to carry and update.

    Args:
      name_or_module: a name in ``MODEL_NAMES`` or a module from this file.
    """
    if isinstance(name_or_module, str):
        return get_model(name_or_module, num_classes=1).uses_batch_stats
    flag = getattr(name_or_module, "uses_batch_stats", None)
    if not isinstance(flag, bool):
        raise ValueError(f"{type(name_or_module).__name__} is not a model of idm_jax.nn.models; "
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

__all__ = ["NORMS", "ACTIVATIONS", "POOLINGS", "ConvNet", "AlexNet", "VGG11", "BasicBlock",
           "ResNet18", "LeNet", "MLP", "AlexNetBN", "VGG11BN", "ResNet18BN", "ResNet18_AP",
           "ResNet18BN_AP", "MODEL_NAMES", "get_model", "uses_batch_stats", "init_variables",
           "count_params"]
