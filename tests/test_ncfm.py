"""NCFM's pieces: the interpolated pool (drawn once per iteration, its trained weights for the
calibration pass), the pool made and read from a folder, and the method run end to end."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idm_jax import data, engine as engine_lib, extractors, methods
from idm_jax import pretrain, validate
from idm_jax import real as real_lib
from idm_jax import presets
from tests.test_methods import tiny_networks


def test_interpolated_pool_draws_one_network_and_one_mix_per_iteration():
    nets = tiny_networks()
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    start, trained = jax.vmap(nets.init_params)(keys), jax.vmap(nets.init_params)(keys[::-1])
    schedule = extractors.interpolated_pool_schedule(start, trained)
    state = schedule.init(keys[0])
    refresh = jax.jit(schedule.refresh)
    seen = set()
    for it in range(30):
        state = refresh(state, jnp.int32(it), jax.random.PRNGKey(100 + it))
        i, l = int(state["index"]), float(state["mix"])
        first, _ = schedule.draw(state, jax.random.PRNGKey(1))
        second, accuracy = schedule.draw(state, jax.random.PRNGKey(2))     # same iteration
        want = l * start["w"][i] + (1 - l) * trained["w"][i]
        np.testing.assert_allclose(first["w"], want, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(first["w"], second["w"])
        np.testing.assert_array_equal(schedule.calibration(state)["w"], trained["w"][i])
        assert 0.0 <= l < 1.0 and float(accuracy) == 0.0
        seen.add(i)
    assert seen == {0, 1, 2}


def smoke_ncfm(pool_dir, **fields):
    config = presets.smoke(methods.with_method(presets.get_preset("digits-ipc1"), "ncfm"))
    return dataclasses.replace(config, pool_dir=str(pool_dir), batch_real=8, iterations=2,
                               num_eval=1, epoch_eval_train=1, cf_frequencies=64, **fields)


def test_a_pretrained_pool_round_trips_and_ncfm_runs_with_calibration(tmp_path):
    dataset = data.load_dataset("digits")
    recipe = dataclasses.replace(pretrain.RECIPES["ncfm"], model="ConvNetW32", epochs=1,
                                 batch=256)
    seen = []
    pool = pretrain.train_pool(dataset, recipe, 2, jax.random.PRNGKey(0),
                               validation_per_class=3, validation_seed=1,
                               progress=lambda done, total: seen.append((done, total)))
    steps = (len(dataset.train_labels) - 3 * 10) // 256         # one epoch, batch 256
    assert seen[-1] == (steps, steps) and [d for d, _ in seen] == sorted({d for d, _ in seen})
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), pool["init"],
                         pool["trained"])
    assert min(jax.tree.leaves(moved)) > 0           # every layer trained, both networks
    _, split = data.split_validation(dataset, 3, 1)
    pretrain.save_pool(tmp_path / "pool", pool, {"model": "ConvNetW32", "dataset": "digits",
                                                  "validation": split.record()})
    real = real_lib.prepare_real(dataset.train_images, dataset.train_labels, dataset.mean,
                                 dataset.std)
    # The run must hold out what the pool held out, and use the pool's network.
    for fields, message in (({}, "held out"),
                            ({"validation_per_class": 3, "validation_seed": 1,
                              "model": "ConvNetW64"}, "made with model 'ConvNetW32'")):
        with pytest.raises(validate.InvalidRun, match=message):
            engine_lib.make_engine(smoke_ncfm(tmp_path / "pool", **fields), 10,
                                   real.image_shape, normalization=(dataset.mean, dataset.std))
    config = smoke_ncfm(tmp_path / "pool", validation_per_class=3, validation_seed=1)
    eng = engine_lib.make_engine(config, 10, real.image_shape,
                                 normalization=(dataset.mean, dataset.std))
    state = engine_lib.init_state(eng, real, 0)
    for got, want in zip(jax.tree.leaves(state.extractors["trained"]),
                         jax.tree.leaves(pool["trained"])):
        np.testing.assert_array_equal(got, want)       # the pool, as trained, in the state
    step = engine_lib.make_step(eng, real)
    for _ in range(2):
        state, metrics = step(state, real)
    assert float(metrics["calibration"]) > 0 and np.isfinite(float(metrics["loss"]))
    assert int(state.image_opt_state.inner[0].count) == 2 * 2 * 10   # 2 passes x 10 classes
    # A method without a calibration network refuses the pass.
    idm = dataclasses.replace(presets.smoke(presets.get_preset("digits-ipc1")),
                              calibration_weight=1.0)
    with pytest.raises(validate.InvalidRun, match="no calibration network"):
        engine_lib.make_engine(idm, 10, real.image_shape)
