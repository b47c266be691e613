"""IID on IDM: its two terms against NumPy, its auxiliary pool drawn once per iteration beside
IDM's untouched queue, and a run end to end."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idm_jax import config as config_lib, data, engine as engine_lib, extractors
from idm_jax import methods, pretrain, validate
from idm_jax import real as real_lib
from idm_jax.methods import iid
from idm_jax import presets
from tests.test_methods import tiny_networks
from tests.test_objectives import np_iid_covariance


def test_iid_objective_is_idm_plus_its_weighted_covariance_and_scatter():
    rng = np.random.default_rng(0)
    real, syn = rng.normal(size=(9, 12)), rng.normal(size=(4, 12))     # 4 positions x 3
    logits, aux = rng.normal(size=(4, 5)), rng.normal(size=(4, 6))
    real, syn, logits, aux = (jnp.asarray(a, jnp.float32) for a in (real, syn, logits, aux))
    mask = jnp.ones(9, bool)
    key = jax.random.PRNGKey(0)
    loss, terms = iid.iid_objective(real, mask, syn, logits, 2, 0.7, key, aux_features=aux,
                                    channels=3)
    a = np.asarray(aux, np.float64)
    np_scatter = sum(np.sum((a[i] - a.mean(0)) ** 2) for i in range(len(a)))
    np_cov = np_iid_covariance(np.asarray(real), np.asarray(syn), 3)
    idm, idm_terms = methods.get("idm").objective(config_lib.Config())(real, mask, syn, logits,
                                                                       2, 0.7, key)
    np.testing.assert_allclose(terms["scatter"], np_scatter, rtol=1e-5)
    np.testing.assert_allclose(terms["covariance"], np_cov, rtol=1e-4)
    np.testing.assert_allclose(loss, idm + 0.03 * np_cov + 0.01 * np_scatter, rtol=1e-5)
    assert terms["mmd"] == idm_terms["mmd"]


def test_the_auxiliary_pool_is_drawn_per_iteration_and_leaves_the_queue_alone():
    nets = tiny_networks()
    pool = jax.vmap(nets.init_params)(jax.random.split(jax.random.PRNGKey(1), 3))
    base = extractors.fresh_schedule(nets, 2)
    schedule = extractors.with_auxiliary_pool(base, pool)
    state, alone = schedule.init(jax.random.PRNGKey(2)), base.init(jax.random.PRNGKey(2))
    refresh, base_refresh = jax.jit(schedule.refresh), jax.jit(base.refresh)   # one compile
    seen = set()
    for it in range(20):
        key = jax.random.PRNGKey(50 + it)
        state, alone = refresh(state, jnp.int32(it), key), base_refresh(alone, jnp.int32(it), key)
        np.testing.assert_array_equal(schedule.draw(state, key)[0]["w"],
                                      base.draw(alone, key)[0]["w"])
        index = int(state["index"])
        np.testing.assert_array_equal(schedule.auxiliary(state)["w"], pool["w"][index])
        seen.add(index)
    assert seen == {0, 1, 2}


def test_iid_runs_with_a_pool_and_refuses_what_cannot_work(tmp_path):
    dataset = data.load_dataset("digits")
    real = real_lib.prepare_real(dataset.train_images, dataset.train_labels, dataset.mean,
                                 dataset.std)
    config = dataclasses.replace(
        presets.smoke(methods.with_method(presets.get_preset("digits-ipc1"), "iid")),
        auxiliary_model="ConvNetW32", batch_real=8, pool_dir=str(tmp_path / "pool"),
        model_train_steps=0)
    with pytest.raises(validate.InvalidRun, match="no pretrained pool there"):
        engine_lib.make_engine(config, 10, real.image_shape)
    net = engine_lib.make_engine(presets.smoke(presets.get_preset("digits-ipc1")), 10,
                                 real.image_shape)
    keys = jax.random.split(jax.random.PRNGKey(3), 2)
    trained = jax.vmap(net.init_params)(keys)       # any ConvNetW32s stand in for a pool
    pretrain.save_pool(tmp_path / "pool", {"init": trained, "trained": trained,
                                           "train_accuracy": [0.0, 0.0]},
                       {"model": "ConvNetW32", "dataset": "digits", "validation": None})
    eng = engine_lib.make_engine(config, 10, real.image_shape)
    state, step = engine_lib.init_state(eng, real, 0), engine_lib.make_step(eng, real)
    for _ in range(2):
        state, metrics = step(state, real)
    assert float(metrics["scatter"]) > 0 and float(metrics["covariance"]) > 0
    assert int(metrics["queue_size"]) >= 3                  # IDM's queue is running
    idm = dataclasses.replace(presets.smoke(presets.get_preset("digits-ipc1")),
                              auxiliary_model="ConvNetW32")
    with pytest.raises(validate.InvalidRun, match="give no auxiliary network"):
        engine_lib.make_engine(idm, 10, real.image_shape)
