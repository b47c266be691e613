"""DC's ResNet18 family for small images, over NHWC: 'ResNet18', 'ResNet18BN', 'ResNet18_AP',
'ResNet18BN_AP' (conventions as ``idm_jax.nn.models``, which registers them by name)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from idm_jax.nn import layers as L

Dtype = Any


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
    conv_op: Callable = lax.conv_general_dilated   # the convolution (backend.Policy.conv_op)

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, mask: Optional[jnp.ndarray] = None):
        strided = self.downsample == "stride"
        conv_stride = self.stride if strided else 1
        y = L.conv(x, self.features, 3, padding=1, stride=conv_stride, use_bias=False,
                  dtype=self.dtype, name="conv1", conv_op=self.conv_op)
        y = nn.relu(L.normalise(self.norm, y, train=train, mask=mask, dtype=self.dtype,
                               name="norm1"))
        if not strided and self.stride != 1:
            y = nn.avg_pool(y, (2, 2), strides=(2, 2), padding="VALID")
        y = L.conv(y, self.features, 3, padding=1, use_bias=False, dtype=self.dtype,
                   name="conv2", conv_op=self.conv_op)
        y = L.normalise(self.norm, y, train=train, mask=mask, dtype=self.dtype, name="norm2")
        if self.stride != 1 or x.shape[-1] != self.features:
            s = L.conv(x, self.features, 1, padding=0, stride=conv_stride, use_bias=False,
                      dtype=self.dtype, name="shortcut_conv", conv_op=self.conv_op)
            if not strided and self.stride != 1:
                s = nn.avg_pool(s, (2, 2), strides=(2, 2), padding="VALID")
            s = L.normalise(self.norm, s, train=train, mask=mask, dtype=self.dtype,
                           name="shortcut_norm")
        else:
            s = x
        return nn.relu(y + s)


class ResNet18(L.ChoosesNorm, nn.Module):
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
    conv_op: Callable = lax.conv_general_dilated   # the convolution (backend.Policy.conv_op)

    def _check_fields(self) -> None:
        L.check_choice("downsample", self.downsample, ("stride", "avgpool"))

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, mask: Optional[jnp.ndarray] = None):
        L.check_input(x)
        x = x.astype(self.dtype)
        x = L.conv(x, 64, 3, padding=1, use_bias=False, dtype=self.dtype,
                   name="stem_conv", conv_op=self.conv_op)
        x = nn.relu(L.normalise(self.norm, x, train=train, mask=mask, dtype=self.dtype,
                               name="stem_norm"))
        for stage, (features, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2))):
            for b in range(2):
                if self.downsample == "avgpool" and b == 0 and stride != 1 and (
                        x.shape[1] < 2 or x.shape[2] < 2):
                    raise ValueError(f"feature map {x.shape[1]}x{x.shape[2]} is too small for "
                                     "ResNet18_AP; use a larger input image")
                x = BasicBlock(features=features, stride=stride if b == 0 else 1,
                               norm=self.norm, downsample=self.downsample, dtype=self.dtype,
                               conv_op=self.conv_op,
                               name=f"layer{stage + 1}_block{b}")(x, train=train, mask=mask)
        if self.downsample == "stride":
            if x.shape[1] < 4 or x.shape[2] < 4:
                raise ValueError(f"ResNet18 ends with a 4x4 average pool but the final feature "
                                 f"map is {x.shape[1]}x{x.shape[2]}; use inputs of at least "
                                 "25x25 pixels")
            x = nn.avg_pool(x, (4, 4), strides=(4, 4), padding="VALID")
        return L.outputs(x, self.num_classes, self.dtype)


def ResNet18BN(num_classes: int, dtype: Dtype = jnp.float32,
               conv_op: Callable = lax.conv_general_dilated) -> ResNet18:
    """DC 'ResNet18BN': ResNet18 with BatchNorm."""
    return ResNet18(num_classes, norm="batchnorm", dtype=dtype, conv_op=conv_op)


def ResNet18_AP(num_classes: int, dtype: Dtype = jnp.float32,
                conv_op: Callable = lax.conv_general_dilated) -> ResNet18:
    """DC 'ResNet18_AP': strided convs replaced by stride-1 convs + 2x2 average pooling."""
    return ResNet18(num_classes, downsample="avgpool", dtype=dtype, conv_op=conv_op)


def ResNet18BN_AP(num_classes: int, dtype: Dtype = jnp.float32,
                  conv_op: Callable = lax.conv_general_dilated) -> ResNet18:
    """DC 'ResNet18BN_AP': ResNet18_AP with BatchNorm."""
    return ResNet18(num_classes, norm="batchnorm", downsample="avgpool", dtype=dtype,
                    conv_op=conv_op)


__all__ = ["BasicBlock", "ResNet18", "ResNet18BN", "ResNet18_AP", "ResNet18BN_AP"]
