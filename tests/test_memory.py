"""The memory-aware chunk: the rule, its byte counts, the same values as whole batches, and
every paper preset fitting one H200 by it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idm_jax import data
from idm_jax.accel import backend, memory, microbatch, ops
from idm_jax.nn import models
from idm_jax import engine as engine_lib
from idm_jax import real as real_lib
from idm_jax import presets
from tests.test_engine import MEAN, STD, tiny_config, tiny_data

H200_BYTES = 139 * 10 ** 9
# Images in the largest class of each dataset's train split (ImageNet classes hold <= 1300).
LARGEST_CLASS = {"cifar10": 5000, "cifar100": 500, "tinyimagenet": 500,
                 "imagenet_subset": 1300, "digits": 190}


def test_choose_chunk_is_whole_batches_when_they_fit_and_shrinks_with_the_budget():
    assert memory.choose_chunk(1000, 10, 10_000) == 0
    chunks = [memory.choose_chunk(1000, 10, budget) for budget in (9_999, 5_000, 1_000, 10, 3)]
    assert chunks == [999, 500, 100, 1, 1]


def test_activation_bytes_count_every_intermediate_value():
    def apply(p, x):                                   # x: (1, 4, 4, 3) float32
        return jnp.tanh(x * p), jnp.sum(x)
    # x * p: 48 floats, tanh: 48 floats, sum: 1 float -> 97 * 4 bytes.
    assert memory.activation_bytes_per_image(apply, jnp.float32(2.0), (4, 4, 3)) == 97 * 4

    def nested(p, x):                                  # a jitted call inside is counted inside
        return jax.jit(lambda y: jnp.tanh(y * p))(x), jnp.sum(x)
    assert memory.activation_bytes_per_image(nested, jnp.float32(2.0), (4, 4, 3)) == 97 * 4


def preset_plan(name, device_bytes=H200_BYTES, **overrides):
    config = dataclasses.replace(presets.get_preset(name), **overrides)
    spec = data.DATASET_INFO[config.dataset]
    model = models.get_model(config.model, spec.num_classes, conv_op=jax.lax.conv_general_dilated)
    shape = spec.image_shape
    params = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1,) + shape))["params"],
                            jax.random.PRNGKey(0))
    apply = lambda p, x: model.apply({"params": p}, x)
    return memory.plan(config, spec.num_classes, shape, LARGEST_CLASS[config.dataset], apply,
                       params, device_bytes)


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_every_paper_preset_fits_one_h200_by_the_rule(name):
    plan = preset_plan(name)
    assert plan.peak <= memory.DEVICE_FRACTION * H200_BYTES, memory.describe(plan)
    assert plan.chunk == 0 or plan.chunk >= 64, memory.describe(plan)   # still big calls


def test_the_paper_batches_that_do_not_fit_are_chunked():
    # cifar10-ipc1's real batch: 10 classes x 5000 images in one forward.
    plan = preset_plan("cifar10-ipc1")
    assert plan.largest_batch == 50_000 and plan.chunk > 0
    assert plan.largest_batch * plan.per_image > memory.DEVICE_FRACTION * H200_BYTES
    # A smaller budget, a smaller chunk; an impossible one is a clear error.
    small = preset_plan("cifar10-ipc1", memory_budget_gb=8.0)
    assert 0 < small.chunk < plan.chunk
    with pytest.raises(ValueError, match="memory_budget_gb"):
        preset_plan("imagenet_subset-ipc10", memory_budget_gb=1.0)


def test_remat_chunks_give_the_whole_batch_value_and_gradient():
    model = models.get_model("ConvNetW32", 3, conv_op=jax.lax.conv_general_dilated)
    x = jax.random.normal(jax.random.PRNGKey(0), (12, 8, 8, 3))
    params = model.init(jax.random.PRNGKey(1), x[:1])["params"]

    def loss(images, chunk, remat):
        emb, logits = microbatch.apply_in_chunks(lambda v: model.apply({"params": params}, v),
                                                 images, chunk, remat=remat)
        return jnp.sum(emb ** 2) + jnp.sum(jnp.sin(logits))

    whole, g_whole = jax.value_and_grad(loss)(x, 0, False)
    value, g_remat = jax.jit(jax.value_and_grad(loss), static_argnums=(1, 2))(x, 4, True)
    np.testing.assert_allclose(value, whole, rtol=1e-5)
    np.testing.assert_allclose(g_remat, g_whole, rtol=1e-4, atol=1e-5)


def test_an_accelerator_engine_chunks_to_its_budget_with_the_whole_batch_result(monkeypatch):
    images, labels = tiny_data()
    real = real_lib.prepare_real(images, labels, MEAN, STD)
    config = tiny_config(iterations=1, model_train_steps=1, fetch_net_num=1)
    accelerator = backend.Policy(platform="gpu", chunk=0, cpu_kernels=False, vmap_models=True)
    monkeypatch.setattr(backend, "resolve", lambda *a, **k: accelerator)
    monkeypatch.setattr(memory, "device_memory_bytes", lambda device=None: 10 ** 12)

    def run(cfg):
        engine = engine_lib.make_engine(cfg, real.num_classes, real.image_shape,
                                        max_per_class=real.max_per_class)
        state = engine_lib.init_state(engine, real, 0)
        step = engine_lib.make_step(engine, real)
        state, _ = step(state, real)        # one iteration: matching, update, queue training
        return engine, state.images

    whole, whole_images = run(config)
    assert whole.policy.chunk == 0 and not whole.policy.remat
    params = jax.eval_shape(whole.init_params, jax.random.PRNGKey(0))
    sizes = memory.plan(config, real.num_classes, real.image_shape, real.max_per_class,
                        whole.apply, params, None)
    # A budget for the resident state and 6 (and a half) images in flight.
    budget_gb = (sizes.resident + 6.5 * sizes.per_image) / 2 ** 30
    chunked, chunked_images = run(dataclasses.replace(config, memory_budget_gb=budget_gb))
    assert chunked.policy.chunk == 6 and chunked.policy.remat
    np.testing.assert_allclose(chunked_images, whole_images, rtol=1e-4, atol=2e-4)


# ------------------------------------------------------------------ CPU: remat when memory is short
def test_residual_bytes_count_what_the_backward_pass_keeps_per_image():
    w = jnp.ones((48, 5))

    def linear(p, x):            # the input gradient needs only the weights: nothing per image
        return x.reshape(x.shape[0], -1) @ p
    assert memory.residual_bytes_per_image(linear, w, (4, 4, 3)) == 0

    def waved(p, x):             # and sin's derivative cos(x @ w) at the 5 outputs per image
        return jnp.sin(x.reshape(x.shape[0], -1) @ p)
    assert memory.residual_bytes_per_image(waved, w, (4, 4, 3)) == 5 * 4


def cifar_rule(num_classes, ipc, host_bytes=24 * 2 ** 30, **overrides):
    config = dataclasses.replace(presets.get_preset("cifar10-ipc10"), ipc=ipc, **overrides)
    model = models.get_model(config.model, num_classes, conv_op=ops.conv2d)
    params = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)))["params"],
                            jax.random.PRNGKey(0))
    apply = lambda p, x: model.apply({"params": p}, x)
    return memory.cpu_needs_remat(config, num_classes, (32, 32, 3), 5000, apply, params,
                                  host_bytes)


def test_cpu_remat_only_where_the_kept_activations_do_not_fit():
    # The paper's CIFAR-10 settings keep every activation on a 24 GiB host (the faithful path
    # is untouched); 1000 classes at IPC 10 keep 40,000 views' worth and must recompute.
    for ipc in (1, 10, 50):
        assert not cifar_rule(10, ipc)
    assert cifar_rule(1000, 10)
    assert not cifar_rule(1000, 10, host_bytes=None)             # unknown budget: as before
    assert cifar_rule(10, 10, memory_budget_gb=0.5)              # the flag overrides the host
    assert not cifar_rule(1000, 10, memory_budget_gb=10_000.0)


def test_host_memory_is_found():
    assert memory.host_memory_bytes() > 2 ** 30


def test_a_cpu_engine_short_of_memory_recomputes_with_the_same_result(monkeypatch):
    images, labels = tiny_data()
    real = real_lib.prepare_real(images, labels, MEAN, STD)
    config = tiny_config(iterations=1, model_train_steps=1, fetch_net_num=1)

    def run(host_bytes):
        monkeypatch.setattr(memory, "host_memory_bytes", lambda: host_bytes)
        engine = engine_lib.make_engine(config, real.num_classes, real.image_shape,
                                        max_per_class=real.max_per_class)
        state = engine_lib.init_state(engine, real, 0)
        state, _ = engine_lib.make_step(engine, real)(state, real)
        return engine, state.images

    kept, kept_images = run(10 ** 12)
    recomputed, recomputed_images = run(10 ** 3)
    assert kept.policy.platform == "cpu" and not kept.policy.remat
    assert recomputed.policy.remat and recomputed.policy.chunk == kept.policy.chunk
    np.testing.assert_allclose(recomputed_images, kept_images, rtol=1e-5, atol=1e-5)
