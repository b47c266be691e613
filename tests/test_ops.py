"""The CPU-speed rewrites of idm_jax.accel.ops against their plain definitions and JAX's autodiff.

``ops.conv2d`` must give ``lax.conv_general_dilated``'s values, input gradients and kernel
gradients, also under vmap over stacked inputs, stacked kernels or both (the batching rule);
``ops.instance_norm``'s hand-written VJP must equal autodiff of the plain formula; and
``ops.loop_over_batched_keys`` must equal the plain function vmapped, values and gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from idm_jax.accel import ops

NHWC = ("NHWC", "HWIO", "NHWC")
EPS = 1e-5


def normal(seed, shape):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def plain_conv(x, w, stride, padding):
    return lax.conv_general_dilated(x, w, stride, padding, dimension_numbers=NHWC)


def fast_conv(x, w, stride, padding):
    return ops.conv2d(x, w, stride, padding, dimension_numbers=NHWC)


# (batch, size, in channels, out channels, kernel, stride, padding): an RGB first layer (the
# im2col kernel gradient), a wide layer (one product per tap), a strided layer (no flipped-kernel
# input gradient), a 1x1 shortcut, and an asymmetric padding.
CASES = [
    (3, 8, 3, 5, 3, 1, ((1, 1), (1, 1))),
    (2, 6, 12, 7, 3, 1, ((1, 1), (1, 1))),
    (2, 9, 4, 6, 3, 2, ((1, 1), (1, 1))),
    (2, 8, 10, 4, 1, 2, ((0, 0), (0, 0))),
    (2, 7, 9, 3, 5, 1, ((2, 1), (0, 2))),
]


@pytest.mark.parametrize("n, size, c, o, k, s, pad", CASES)
def test_conv2d_values_and_both_gradients_equal_lax_autodiff(n, size, c, o, k, s, pad):
    x, w = normal(0, (n, size, size, c)), 0.3 * normal(1, (k, k, c, o))
    stride = (s, s)
    out = fast_conv(x, w, stride, pad)
    np.testing.assert_allclose(out, plain_conv(x, w, stride, pad), rtol=1e-5, atol=1e-5)
    cotangent = normal(2, out.shape)
    got = jax.vjp(lambda a, b: fast_conv(a, b, stride, pad), x, w)[1](cotangent)
    want = jax.vjp(lambda a, b: plain_conv(a, b, stride, pad), x, w)[1](cotangent)
    for g, ref, name in zip(got, want, ("input", "kernel")):
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("axes", [(0, 0), (0, None), (None, 0)])
def test_conv2d_vmap_rule_equals_vmapped_lax_values_and_gradients(axes):
    # Stacked inputs and kernels (models trained together), stacked inputs alone (folded into
    # the batch), stacked kernels alone (folded into the output channels).
    stack, stride, pad = 3, (1, 1), ((1, 1), (1, 1))
    x = normal(3, (stack, 2, 6, 6, 4)) if axes[0] == 0 else normal(3, (2, 6, 6, 4))
    w = 0.3 * (normal(4, (stack, 3, 3, 4, 5)) if axes[1] == 0 else normal(4, (3, 3, 4, 5)))

    def total(conv):
        def loss(a, b):
            y = jax.vmap(lambda p, q: conv(p, q, stride, pad), in_axes=axes)(a, b)
            return jnp.sum(jnp.sin(y)), y
        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, w)

    (got_loss, got_y), got_grads = total(fast_conv)
    (want_loss, want_y), want_grads = total(plain_conv)
    np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for g, ref in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-4)


def test_conv2d_falls_back_to_lax_outside_its_plain_case():
    # Dilation and feature groups are not the CPU path's case: same result as lax.
    x, w = normal(5, (2, 8, 8, 4)), normal(6, (3, 3, 2, 4))
    got = ops.conv2d(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC,
                     feature_group_count=2, rhs_dilation=(2, 2))
    want = lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC,
                                    feature_group_count=2, rhs_dilation=(2, 2))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_instance_norm_gradient_equals_autodiff_of_the_formula():
    # The hand-written VJP against JAX's derivative of the plain two-pass formula, on planes
    # with an offset mean (as conv outputs have), non-trivial scale/bias and a random cotangent.
    def plain(x, scale, bias):
        mean = jnp.mean(x, axis=(1, 2), keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=(1, 2), keepdims=True)
        return (x - mean) / jnp.sqrt(var + EPS) * scale + bias

    x = 2.0 * normal(11, (3, 5, 4, 6)) + jnp.arange(6.0)
    scale, bias = 0.5 + normal(12, (6,)) ** 2, normal(13, (6,))
    cotangent = normal(14, (3, 5, 4, 6))
    out, vjp = jax.vjp(ops.instance_norm, x, scale, bias)
    want_out, want_vjp = jax.vjp(plain, x, scale, bias)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(vjp(cotangent), want_vjp(cotangent)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # The input gradient of a normalised map has zero sum over each plane, for any cotangent.
    np.testing.assert_allclose(jnp.sum(vjp(cotangent)[0], axis=(1, 2)), 0.0, atol=1e-4)


def keyed_transform(key, x):
    """A random choice between three differentiable branches, like a DSA strategy."""
    branch = jax.random.randint(key, (), 0, 3)
    scale = jax.random.uniform(jax.random.fold_in(key, 1), (), minval=0.5, maxval=1.5)
    return lax.switch(branch, [lambda v: v * scale, lambda v: jnp.sin(v) + scale,
                               lambda v: v[::-1] * v], x)


def test_loop_over_batched_keys_equals_the_vmapped_plain_function():
    looped = ops.loop_over_batched_keys(keyed_transform)
    keys = jax.random.split(jax.random.PRNGKey(7), 6)
    x = normal(8, (6, 4, 3))
    np.testing.assert_allclose(jax.vmap(looped)(keys, x), jax.vmap(keyed_transform)(keys, x),
                               rtol=1e-6)
    # A shared input under batched keys, and batched inputs under one key.
    shared = normal(9, (4, 3))
    np.testing.assert_allclose(jax.vmap(looped, in_axes=(0, None))(keys, shared),
                               jax.vmap(keyed_transform, in_axes=(0, None))(keys, shared),
                               rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(looped, in_axes=(None, 0))(keys[0], x),
                               jax.vmap(keyed_transform, in_axes=(None, 0))(keys[0], x),
                               rtol=1e-6)


def test_loop_over_batched_keys_gradient_equals_the_plain_gradient():
    keys = jax.random.split(jax.random.PRNGKey(10), 12)
    x = normal(11, (12, 4, 3))

    def loss(fn):
        return lambda v: jnp.sum(jax.vmap(fn)(keys, v) ** 2)

    got = jax.grad(loss(ops.loop_over_batched_keys(keyed_transform)))(x)
    np.testing.assert_allclose(got, jax.grad(loss(keyed_transform))(x), rtol=1e-5, atol=1e-6)
    # Every branch was taken at least once, so the test covers all three pullbacks.
    branches = {int(jax.random.randint(k, (), 0, 3)) for k in keys}
    assert branches == {0, 1, 2}
