"""Chunked network calls equal whole-batch calls (per-sample networks), for values and grads."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from idm_jax.accel import backend, microbatch
from idm_jax.nn import models


def test_chunk_size_is_the_largest_divisor_not_above_the_request():
    for batch in range(1, 40):
        for chunk in range(0, 45):
            size = microbatch.chunk_size(batch, chunk)
            assert batch % size == 0
            if chunk <= 0 or chunk >= batch:
                assert size == batch
            else:
                assert size <= chunk
                assert all(batch % d for d in range(size + 1, chunk + 1))


def test_resolve_automatic_choice_by_backend():
    assert backend.resolve(-1, "cpu").chunk == backend.CPU_CHUNK
    assert backend.resolve(-1, "gpu").chunk == 0
    assert backend.resolve(0, "cpu").chunk == 0 and backend.resolve(12, "gpu").chunk == 12


@pytest.fixture(scope="module")
def convnet():
    model = models.get_model("ConvNetW32", 5, in_channels=3)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
    images = jax.random.normal(jax.random.PRNGKey(1), (12, 16, 16, 3))
    labels = jnp.arange(12) % 5
    return model, params, images, labels


@pytest.mark.parametrize("chunk", [0, 1, 4, 5, 12])
def test_apply_in_chunks_equals_the_whole_batch(convnet, chunk):
    model, params, images, _ = convnet
    whole = model.apply({"params": params}, images)
    chunked = jax.jit(lambda x: microbatch.apply_in_chunks(
        lambda c: model.apply({"params": params}, c), x, chunk))(images)
    chex.assert_trees_all_close(chunked, whole, atol=1e-5, rtol=1e-5)

    # Gradients through the chunked forward (the synthetic-image path) equal the whole batch's.
    def loss(x, apply):
        embedding, _ = apply(x)
        return jnp.sum(jnp.mean(embedding.reshape(3, 4, -1), axis=1) ** 2)

    g_whole = jax.grad(loss)(images, lambda x: model.apply({"params": params}, x))
    g_chunk = jax.grad(loss)(images, lambda x: microbatch.apply_in_chunks(
        lambda c: model.apply({"params": params}, c), x, chunk))
    np.testing.assert_allclose(g_chunk, g_whole, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk", [3, 4, 6])
def test_value_and_grad_in_chunks_equals_jax_value_and_grad(convnet, chunk):
    model, params, images, labels = convnet

    def loss_fn(p, batch):
        x, y = batch
        logits = model.apply({"params": p}, x)[1]
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, y)) / 12, logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, (images, labels))
    (c_loss, c_logits), c_grads = jax.jit(
        lambda p: microbatch.value_and_grad_in_chunks(loss_fn, p, (images, labels), chunk))(
        params)
    np.testing.assert_allclose(c_loss, loss, rtol=1e-6)
    np.testing.assert_allclose(c_logits, logits, atol=1e-5)   # rows stay in order
    chex.assert_trees_all_close(c_grads, grads, atol=1e-6, rtol=1e-4)


def test_chunks_of_padding_only_are_skipped(convnet):
    model, params, images, labels = convnet
    valid = jnp.arange(12) < 7            # rows 7..11 pad the batch; chunks of 4: the last is
    poisoned = images.at[8:].set(jnp.nan)  # padding only, rows 8..11 hold NaN

    def loss_fn(p, batch):
        x, y, v = batch
        logits = model.apply({"params": p}, x)[1]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum(jnp.where(v, ce, 0.0)) / 7, ()

    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, (images[:7], labels[:7], valid[:7]))
    (c_loss, _), c_grads = jax.jit(lambda p: microbatch.value_and_grad_in_chunks(
        loss_fn, p, (poisoned, labels, valid), 4, row_valid=valid))(params)
    # Row 7 (padding inside a chunk with valid rows) is computed with weight 0; the all-padding
    # chunk never runs, or its NaN would reach the sums.
    np.testing.assert_allclose(c_loss, loss, rtol=1e-6)
    chex.assert_trees_all_close(c_grads, grads, atol=1e-6, rtol=1e-4)


def test_chunked_evaluation_trains_the_same_models():
    from idm_jax import evaluation
    rng = np.random.default_rng(0)
    train_x = jnp.asarray(rng.normal(size=(20, 16, 16, 1)), jnp.float32)   # 2 steps: 16 + 4
    train_y = jnp.asarray(np.arange(20) % 4, jnp.int32)
    test_x = jnp.asarray(rng.normal(size=(40, 16, 16, 1)) + 0.0, jnp.float32)
    test_y = jnp.asarray(np.arange(40) % 4, jnp.int32)
    test_x = test_x + 0.5 * test_y[:, None, None, None]
    train_x = train_x + 0.5 * train_y[:, None, None, None]
    net = models.get_model("ConvNetW32", 4, in_channels=1)
    run = jax.jit(lambda k, chunk: evaluation.train_and_test(
        k, net, train_x, train_y, test_x, test_y, epochs=6, batch_size=16, test_batch=20,
        chunk=chunk), static_argnums=1)
    for seed in range(3):
        key = jax.random.PRNGKey(seed)
        assert float(run(key, 4)) == float(run(key, 0))
