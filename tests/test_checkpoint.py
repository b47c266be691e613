"""Checkpoint/resume is bit-identical; damaged checkpoints are detected and skipped; runs with
result-changing settings are refused."""

import dataclasses
import hashlib
import json
import os

import jax
import numpy as np
import pytest

from idm_jax.runs import checkpoint
from idm_jax import config as config_lib
from idm_jax import engine as engine_lib
from idm_jax import iterating
from idm_jax import real as real_lib
from tests.test_engine import MEAN, STD, tiny_config, tiny_data


def build(config):
    images, labels = tiny_data()
    real = real_lib.prepare_real(images, labels, MEAN, STD)
    engine = engine_lib.make_engine(config, real.num_classes, real.image_shape)
    return engine, real


def run(engine, real, state, until, step):
    for _, state, _ in iterating.iterate(engine, real, state, until=until, step=step):
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


def test_checkpoint_with_result_changing_settings_is_refused(tmp_path):
    config = tiny_config()
    engine, real = build(config)
    state = engine_lib.init_state(engine, real, 0)
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    ckpt.save(state, config, checkpoint.data_meta(real))
    meta = checkpoint.data_meta(real)
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"ipc: 2 -> 3"):
        ckpt.restore(state, dataclasses.replace(config, ipc=3), meta)
    with pytest.raises(checkpoint.CheckpointMismatchError,
                       match=r"seed: 0 -> 1; lr_img: 0.2 -> 0.5.*--restart"):
        ckpt.restore(state, dataclasses.replace(config, lr_img=0.5, seed=1), meta)
    with pytest.raises(checkpoint.CheckpointMismatchError, match="image_shape"):
        ckpt.restore(state, config, {"image_shape": [16, 16, 3], "num_classes": 3})
    # Settings that do not change the condensed set may differ.
    relaxed = dataclasses.replace(config, iterations=99, checkpoint_every=7, num_eval=1,
                                  eval_every=5, exports="npz")
    restored = ckpt.restore(state, relaxed, meta)
    np.testing.assert_array_equal(restored.images, state.images)


def test_result_differences_covers_every_field_but_the_resumable_ones():
    base = tiny_config()
    for field in dataclasses.fields(base):
        value = getattr(base, field.name)
        if isinstance(value, str) or field.name == "initial_models":
            continue  # strings need valid choices; initial_models is bounded by net_num
        changed = {bool: lambda v: not v, int: lambda v: v + 2,
                   float: lambda v: v + 0.125}[type(value)](value)
        lines = config_lib.result_differences(base.to_dict(),
                                              dataclasses.replace(base, **{field.name: changed}))
        assert bool(lines) == (field.name not in config_lib.RESUMABLE_FIELDS), field.name


def test_state_digest_is_sha256_of_dtype_shape_and_bytes():
    config = tiny_config()
    engine, real = build(config)
    state = engine_lib.init_state(engine, real, 0)
    digest = checkpoint.state_digest(state)
    images = np.asarray(state.images)
    expected = hashlib.sha256(f"{images.dtype.str}{images.shape}".encode() + images.tobytes())
    assert digest[".images"] == expected.hexdigest()
    assert len(digest) == len(jax.tree.leaves(state))
    changed = state.replace(images=state.images.at[0, 0, 0, 0].add(1e-3))
    assert checkpoint.state_digest(changed)[".images"] != digest[".images"]


def _corrupt_largest_data_file(step_dir):
    files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(step_dir, "state"))
             for name in names]
    target = max(files, key=os.path.getsize)
    with open(target, "r+b") as f:
        f.seek(os.path.getsize(target) // 2)
        f.write(b"\xff" * 8)


def _two_checkpoints(tmp_path):
    config = tiny_config()
    engine, real = build(config)
    meta = checkpoint.data_meta(real)
    step = engine_lib.make_step(engine, real)
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
    first = run(engine, real, engine_lib.init_state(engine, real, 0), 1, step)
    ckpt.save(first, config, meta)
    first_values = jax.device_get(first)        # the step donates its input state
    second = run(engine, real, first, 2, step)
    ckpt.save(second, config, meta)
    template = engine_lib.init_state(engine, real, 0)
    return ckpt, config, meta, template, first_values, second


@pytest.mark.parametrize("damage", ["bytes", "manifest", "metadata", "nan"])
def test_damaged_latest_checkpoint_is_set_aside_and_the_previous_one_resumed(tmp_path, damage):
    ckpt, config, meta, template, first, second = _two_checkpoints(tmp_path)
    latest = os.path.join(ckpt.directory, "2")
    if damage == "bytes":             # silent corruption of the stored arrays
        _corrupt_largest_data_file(latest)
    elif damage == "manifest":
        os.remove(os.path.join(latest, "state", "manifest.ocdbt"))
    elif damage == "metadata":
        os.remove(os.path.join(latest, "meta", "metadata"))
    else:                             # a checkpoint that holds non-finite images
        ckpt.close()
        import shutil
        shutil.rmtree(latest)
        ckpt = checkpoint.Checkpointer(ckpt.directory)
        ckpt.save(second.replace(images=second.images * np.nan), config, meta)
    with pytest.raises(checkpoint.CheckpointDamagedError, match="checkpoint .*/2 "):
        ckpt.restore(template, config, meta, step=2)
    warnings = []
    state, step = ckpt.restore_latest(template, config, meta, warn=warnings.append)
    assert step == 1
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(first)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(warnings) == 1 and "/2" in warnings[0] and "moved to" in warnings[0]
    assert ckpt.all_steps() == [1]                      # the intact one is kept
    assert os.path.isdir(os.path.join(ckpt.directory + "-damaged", "2"))
    # The resumed run can save that iteration again.
    ckpt.save(second, config, meta)
    assert ckpt.all_steps() == [1, 2]


def test_no_intact_checkpoint_means_a_fresh_start(tmp_path):
    ckpt, config, meta, template, first, _ = _two_checkpoints(tmp_path)
    for step in ("1", "2"):
        os.remove(os.path.join(ckpt.directory, step, "state", "manifest.ocdbt"))
    warnings = []
    assert ckpt.restore_latest(template, config, meta, warn=warnings.append) == (None, None)
    assert len(warnings) == 2 and ckpt.all_steps() == []


def test_resume_refuses_another_run_instead_of_falling_back(tmp_path):
    ckpt, config, meta, template, first, _ = _two_checkpoints(tmp_path)
    with pytest.raises(checkpoint.CheckpointMismatchError):
        ckpt.restore_latest(template, dataclasses.replace(config, ce_weight=0.1), meta)
    assert ckpt.all_steps() == [1, 2]


def test_a_failed_write_leaves_the_old_file_whole_and_no_temporary_behind(tmp_path, monkeypatch):
    path = str(tmp_path / "results.json")
    checkpoint.dump_json(path, {"b": 1, "a": [1, 2]})
    assert json.loads(open(path).read()) == {"a": [1, 2], "b": 1}
    with pytest.raises(TypeError):
        checkpoint.dump_json(path, {"a": object()})          # JSON cannot hold it

    class HalfThenFullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[:len(text) // 2])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "open", lambda p, mode: HalfThenFullDisk(open(p, mode)),
                        raising=False)
    with pytest.raises(OSError, match="No space"):
        checkpoint.write_text(path, "x" * 1000)
    monkeypatch.undo()
    assert json.loads(open(path).read()) == {"a": [1, 2], "b": 1}
    assert os.listdir(tmp_path) == ["results.json"]
