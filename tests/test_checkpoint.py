"""Checkpoint/resume is bit-identical; foreign or damaged checkpoints are refused; npz export."""

import dataclasses
import os

import jax
import numpy as np
import pytest

from idm_jax import checkpoint
from idm_jax import engine as engine_lib
from idm_jax import real as real_lib
from tests.test_engine import MEAN, STD, tiny_config, tiny_data


def build(config):
    images, labels = tiny_data()
    real = real_lib.prepare_real(images, labels, MEAN, STD)
    engine = engine_lib.make_engine(config, real.num_classes, real.image_shape)
    return engine, real


def run(engine, real, state, until, step):
    for _, state, _ in engine_lib.iterate(engine, real, state, until=until, step=step):
        pass
    return state


def test_resumed_run_is_bit_identical_to_uninterrupted(tmp_path):
    config = tiny_config(iterations=30, net_generate_interval=4, eval_interval=7)
    engine, real = build(config)
    step = engine_lib.make_step(engine, real)
    meta = checkpoint.data_meta(real)

    straight = run(engine, real, engine_lib.init_state(engine, real, config.seed), 30, step)

    first = run(engine, real, engine_lib.init_state(engine, real, config.seed), 15, step)
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
    assert ckpt.save(first, config, meta) == 15
    ckpt.close()
    del first

    # A new process would rebuild everything from the config; only the checkpoint carries over.
    engine2, real2 = build(config)
    reopened = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
    assert reopened.latest_step() == 15
    template = engine_lib.init_state(engine2, real2, config.seed + 99)
    restored = reopened.restore(template, config, meta)
    assert int(restored.iteration) == 15
    resumed = run(engine2, real2, restored, 30, engine_lib.make_step(engine2, real2))

    leaves_a, tree_a = jax.tree.flatten(straight)
    leaves_b, tree_b = jax.tree.flatten(resumed)
    assert tree_a == tree_b
    for a, b in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checkpoint_of_another_config_is_refused(tmp_path):
    config = tiny_config()
    engine, real = build(config)
    state = engine_lib.init_state(engine, real, 0)
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    ckpt.save(state, config, checkpoint.data_meta(real))
    other = dataclasses.replace(config, ipc=3)
    with pytest.raises(checkpoint.CheckpointMismatchError, match="ipc: checkpoint 2, now 3"):
        ckpt.restore(state, other, checkpoint.data_meta(real))
    with pytest.raises(checkpoint.CheckpointMismatchError, match="image_shape"):
        ckpt.restore(state, config, {"image_shape": [16, 16, 3], "num_classes": 3})
    with pytest.warns(UserWarning, match="changed settings"):
        ckpt.restore(state, dataclasses.replace(config, iterations=99),
                     checkpoint.data_meta(real))


def test_damaged_checkpoint_gives_a_clear_error(tmp_path):
    config = tiny_config()
    engine, real = build(config)
    state = engine_lib.init_state(engine, real, 0)
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    ckpt.save(state, config, checkpoint.data_meta(real))
    state_dir = tmp_path / "0" / "state"
    for root, _, files in os.walk(state_dir):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    with pytest.raises(checkpoint.CheckpointMismatchError, match="could not be read"):
        ckpt.restore(state, config, checkpoint.data_meta(real))


def test_npz_export_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    mean, std = np.array([0.4, 0.5, 0.6]), np.array([0.2, 0.25, 0.3])
    pixels = rng.uniform(0, 1, size=(6, 8, 8, 3)).astype(np.float32)
    normalised = (pixels - mean) / std
    path = str(tmp_path / "set.npz")
    checkpoint.export_npz(path, normalised, np.repeat(np.arange(3), 2), mean, std)
    data = checkpoint.load_npz(path)
    np.testing.assert_allclose(data["images"], pixels, atol=1e-6)
    np.testing.assert_array_equal(data["labels"], np.repeat(np.arange(3), 2))
    np.testing.assert_allclose(data["mean"], mean, rtol=1e-6)
    assert data["images"].min() >= 0 and data["images"].max() <= 1
    np.savez(str(tmp_path / "bad.npz"), pictures=pixels)
    with pytest.raises(ValueError, match="lacks"):
        checkpoint.load_npz(str(tmp_path / "bad.npz"))
