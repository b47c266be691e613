"""Sharding the condensation over devices: same numbers as one device, really split, resumable.

JAX fixes the device count when it starts, so the multi-device checks run in subprocesses on CPU
with ``--xla_force_host_platform_device_count=N``. Each writes its states (.npz) and facts (.json)
to a folder; the tests here compare them against a single-device reference run, also computed in
a subprocess. Processes that do not depend on each other run two at a time, and all share a
persistent compilation cache (the 1-device resume reuses the reference's compiled step). Every
process pays the JAX import and its compiles, so shapes are tiny and the work is balanced.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from idm_jax.accel import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One worker script; argv: mode, output folder. Tiny shapes and a cheap model and DSA keep the
# compile short; opt level 0 halves XLA's CPU compile time (same flags for every process).
WORKER = r'''
import json, os, re, socket, sys, time
start = time.perf_counter()
mode, out = sys.argv[1], sys.argv[2]
from idm_jax.accel import sharding
if mode == "one":  # must come before any JAX call
    with socket.socket() as s:
        s.bind(("localhost", 0)); port = s.getsockname()[1]
    joined = sharding.initialize_distributed(f"localhost:{port}", 1, 0)
import dataclasses
import jax
import numpy as np
jax.config.update("jax_compilation_cache_dir", os.path.join(out, "..", "xla_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
from idm_jax.runs import checkpoint
from idm_jax import engine as engine_lib
from idm_jax import iterating
from idm_jax import real as real_lib
from tests.test_engine import MEAN, STD, tiny_config, tiny_data

CONFIG = tiny_config(iterations=4, model="ConvNetD1", dsa_strategy="color_crop",
                     net_generate_interval=2, eval_interval=3)
CKPT = os.path.join(out, "..", "ckpt")
facts = {"devices": jax.device_count()}

def dump(name, state):
    leaves = jax.tree_util.tree_leaves_with_path(state)
    np.savez(os.path.join(out, name + ".npz"),
             **{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves})

def spec(x):
    return [list(x.sharding.spec), len(x.addressable_shards),
            [list(s.data.shape) for s in x.addressable_shards]]

def setup(k):
    images, labels = tiny_data(num_classes=k)
    config = CONFIG if k == 4 else dataclasses.replace(CONFIG, iterations=3)
    real = real_lib.prepare_real(images, labels, MEAN, STD)
    return config, images, labels, engine_lib.make_engine(config, k, real.image_shape), real

def run(engine, real, state, until, **kw):
    for _, state, _ in iterating.iterate(engine, real, state, until=until, **kw):
        pass
    return state

if mode == "reference":  # one device, no mesh: today's program
    config, _, _, engine, real = setup(4)
    step = engine_lib.make_step(engine, real)
    state = run(engine, real, engine_lib.init_state(engine, real, config.seed), 2, step=step)
    dump("k4_it2", state)
    dump("k4_it4", run(engine, real, state, 4, step=step))

elif mode == "four":  # K=4 on 4 devices; checkpoint at iteration 2
    mesh = sharding.make_mesh()
    config, images, labels, engine, _ = setup(4)
    real = real_lib.prepare_real(images, labels, MEAN, STD, mesh=mesh)
    state = engine_lib.shard_state(engine_lib.init_state(engine, real, config.seed), mesh)
    step = engine_lib.make_step(engine, real, mesh=mesh)
    hlo = step.lower(state, real).compile().as_text()
    facts["gathered"] = re.findall(r"= \w+\[([\d,]*)\]\S* all-gather\(", hlo)
    first, _ = step(state, real)
    facts["donated"] = bool(state.images.is_deleted())
    ckpt = checkpoint.Checkpointer(CKPT)
    for _, state, _ in iterating.iterate(engine, real, first, until=4, step=step, mesh=mesh):
        if int(state.iteration) == 2:
            ckpt.save(state, config, checkpoint.data_meta(real))
    ckpt.close()
    dump("k4_it4", state)
    facts.update(per_class=spec(real.per_class), images=spec(state.images),
                 momentum=spec(state.image_opt_state), counts=spec(real.counts),
                 queue_leaf=spec(jax.tree.leaves(state.extractors.params)[0]),
                 padded={f"{k},4": sharding.padded_size(k, mesh) for k in (1, 4, 10, 13)})
    # K=3 on 4 devices: one device holds only a padding class, and the 6 synthetic rows are
    # stored replicated.
    config3, images3, labels3, _, _ = setup(3)
    _, state3 = iterating.condense(config3, images3, labels3, mean=MEAN, std=STD, mesh=mesh)
    dump("k3_it3", state3)
    facts["images3"] = spec(state3.images)

elif mode == "two":
    mesh = sharding.make_mesh()
    config3, images3, labels3, engine3, real_plain = setup(3)
    try:
        engine_lib.make_step(engine3, real_plain, mesh=mesh)
        facts["unpadded_error"] = None
    except ValueError as err:
        facts["unpadded_error"] = str(err)
    # Three ways to place the uneven K=3 data on 2 devices must agree.
    counts = np.bincount(labels3, minlength=3)
    own = sharding.host_class_slice(3, mesh)
    placed = {"prepare_real": real_lib.prepare_real(images3, labels3, MEAN, STD, mesh=mesh),
              "shard_real": real_lib.shard_real(real_plain, mesh),
              "host_shard": real_lib.real_from_host_shard(images3, labels3, counts, MEAN, STD,
                                                          mesh)}
    facts["host_slice"] = [own.start, own.stop]
    facts["placements"] = {name: [spec(r.per_class), r.num_classes] for name, r in placed.items()}
    np.savez(os.path.join(out, "placements.npz"),
             **{f"{name}.{field}": np.asarray(getattr(r, field)) for name, r in placed.items()
                for field in ("per_class", "counts", "flat_index", "mean", "std")},
             plain_per_class=np.asarray(real_plain.per_class))
    # The library entry point on the mesh (uneven classes).
    _, state3 = iterating.condense(config3, images3, labels3, mean=MEAN, std=STD, mesh=mesh)
    dump("k3_it3", state3)
    facts.update(images3=spec(state3.images), per_class3=spec(placed["prepare_real"].per_class),
                 padded={f"{k},2": sharding.padded_size(k, mesh) for k in (1, 3, 4, 10)})
    # Resume the 4-device checkpoint on 2 devices.
    config, images, labels, engine, _ = setup(4)
    real = real_lib.prepare_real(images, labels, MEAN, STD, mesh=mesh)
    template = engine_lib.shard_state(engine_lib.init_state(engine, real, config.seed + 99), mesh)
    ckpt = checkpoint.Checkpointer(CKPT)
    restored = ckpt.restore(template, config, checkpoint.data_meta(real))
    facts["restored_images"] = spec(restored.images)
    dump("restored", restored)
    dump("resumed", run(engine, real, restored, 4, step=engine_lib.make_step(engine, real,
                                                                             mesh=mesh)))

elif mode == "one":  # resume the 4-device checkpoint on one device, without and with a mesh
    facts["joined"], facts["processes"] = joined, jax.process_count()
    # (Also the plain K=3 reference: this process has the least to compile.)
    config3, images3, labels3, _, _ = setup(3)
    _, state3 = iterating.condense(config3, images3, labels3, mean=MEAN, std=STD)
    dump("k3_it3", state3)
    config, images, labels, engine, real = setup(4)
    ckpt = checkpoint.Checkpointer(CKPT)
    template = engine_lib.init_state(engine, real, config.seed + 99)
    restored = ckpt.restore(template, config, checkpoint.data_meta(real))
    dump("restored", restored)
    dump("resumed", run(engine, real, restored, 4))
    mesh = sharding.make_mesh(1)
    again = engine_lib.shard_state(ckpt.restore(template, config, checkpoint.data_meta(real)), mesh)
    dump("resumed_mesh1", run(engine, real, again, 4, mesh=mesh))

facts["seconds"] = time.perf_counter() - start
with open(os.path.join(out, "facts.json"), "w") as f:
    json.dump(facts, f)
'''


def _start(mode, devices, base):
    out = base / mode
    out.mkdir()
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                         f"--xla_backend_optimization_level=0")
    return out, subprocess.Popen([sys.executable, "-c", WORKER, mode, str(out)], cwd=ROOT,
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)


def _finish(started, timeout=240):
    for mode, (_, proc) in started.items():
        log, _ = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"worker {mode} failed:\n{log[-6000:]}"


class Results:
    def __init__(self, outs):
        self.outs = outs

    def facts(self, mode):
        with open(self.outs[mode] / "facts.json") as f:
            return json.load(f)

    def state(self, mode, name):
        with np.load(self.outs[mode] / f"{name}.npz") as data:
            return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    base = tmp_path_factory.mktemp("sharding")
    first = {"reference": _start("reference", 1, base), "four": _start("four", 4, base)}
    _finish(first)   # "two" and "one" resume the checkpoint that "four" writes
    second = {"two": _start("two", 2, base), "one": _start("one", 1, base)}
    _finish(second)
    return Results({mode: out for mode, (out, _) in {**first, **second}.items()})


def assert_states_close(got, want, atol=2e-5, rtol=1e-5):
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        if np.issubdtype(want[name].dtype, np.floating):
            np.testing.assert_allclose(got[name], want[name], atol=atol, rtol=rtol, err_msg=name)
        else:  # keys, counters, slots, iteration: exactly equal
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def assert_states_equal(got, want):
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


# ------------------------------------------------------------------ sharded = single device
def test_four_device_iteration_matches_single_device(results):
    want = results.state("reference", "k4_it4")
    got = results.state("four", "k4_it4")
    assert_states_close(got, want)
    assert int(got[".iteration"]) == 4
    # The run did move the images, so agreement is not trivial.
    assert np.abs(want[".images"] - results.state("reference", "k4_it2")[".images"]).max() > 1e-3


@pytest.mark.parametrize("mode", ["two", "four"])
def test_uneven_classes_match_single_device(results, mode):
    # K=3 on 2 or 4 devices: the class axis is padded to 4, via condense(mesh=...).
    assert_states_close(results.state(mode, "k3_it3"), results.state("one", "k3_it3"))


def test_arrays_are_split_over_the_mesh(results):
    four, two = results.facts("four"), results.facts("two")
    assert four["devices"] == 4 and two["devices"] == 2
    # per_class (K=4, Nmax=10, 8, 8, 3): one class per device.
    assert four["per_class"] == [["data"], 4, [[1, 10, 8, 8, 3]] * 4]
    # synthetic rows K*ipc = 8: two rows (one class) per device; momentum alike.
    assert four["images"] == [["data"], 4, [[2, 8, 8, 3]] * 4]
    assert four["momentum"] == four["images"]
    # Small state is replicated: every device holds the whole array.
    assert four["counts"] == [[], 4, [[4]] * 4]
    assert four["queue_leaf"][0] == [] and four["queue_leaf"][1] == 4
    # Uneven K=3 on 2 devices: real data padded to 4 classes, 2 per device.
    assert two["per_class3"] == [["data"], 2, [[2, 10, 8, 8, 3]] * 2]
    assert two["images3"] == [["data"], 2, [[3, 8, 8, 3]] * 2]
    assert four["images3"] == [[], 4, [[6, 8, 8, 3]] * 4]   # 4 does not divide 6 rows
    assert four["donated"], "the sharded step must donate its input state"


def test_no_image_batch_is_gathered_across_devices(results):
    # Every device augments and embeds its own classes' images; an all-gather of an image-shaped
    # tensor (..., 8, 8, 3) would put every class's batch on every device (K = 1000 would not
    # fit). Small index and score arrays may be gathered.
    gathered = [[int(d) for d in shape.split(",") if d] for shape in
                results.facts("four")["gathered"]]
    assert all(shape[-3:] != [8, 8, 3] for shape in gathered), gathered


def test_padded_class_count(results):
    for facts in (results.facts("four"), results.facts("two")):
        for key, value in facts["padded"].items():
            k, n = map(int, key.split(","))
            assert value == math.ceil(k / n) * n and value % n == 0 and value >= k


def test_unpadded_real_data_on_uneven_mesh_is_refused(results):
    message = results.facts("two")["unpadded_error"]
    assert message is not None and "shard_real" in message


def test_host_shard_placement_equals_full_placement(results):
    two = results.facts("two")
    assert two["host_slice"] == [0, 3]   # one process owns every class
    arrays = results.state("two", "placements")
    plain = arrays["plain_per_class"]                       # (3, Nmax, H, W, C) unpadded
    for name in ("prepare_real", "shard_real", "host_shard"):
        per_class = arrays[f"{name}.per_class"]
        assert per_class.shape == (4,) + plain.shape[1:]
        np.testing.assert_array_equal(per_class[:3], plain)
        assert not per_class[3].any()                       # the padding class is empty
        assert two["placements"][name] == [[["data"], 2,
                                            [[2] + list(plain.shape[1:])] * 2], 3]
        for field in ("counts", "flat_index", "mean", "std"):
            np.testing.assert_array_equal(arrays[f"{name}.{field}"],
                                          arrays[f"prepare_real.{field}"])
    np.testing.assert_array_equal(arrays["prepare_real.counts"], [10, 10, 10])


# ------------------------------------------------------------------ checkpoints across meshes
def test_four_device_checkpoint_restores_on_two_and_one_device(results):
    on_two, on_one = results.state("two", "restored"), results.state("one", "restored")
    assert_states_equal(on_two, on_one)                     # a lossless re-layout
    assert int(on_one[".iteration"]) == 2
    assert_states_close(on_one, results.state("reference", "k4_it2"))
    assert results.facts("two")["restored_images"] == [["data"], 2,
                                                       [[4, 8, 8, 3]] * 2]


def test_resumed_runs_continue_like_the_uninterrupted_one(results):
    straight = results.state("four", "k4_it4")
    reference = results.state("reference", "k4_it4")
    for mode, name in (("two", "resumed"), ("one", "resumed"), ("one", "resumed_mesh1")):
        got = results.state(mode, name)
        assert_states_close(got, straight)
        assert_states_close(got, reference)


def test_one_device_mesh_is_the_plain_program(results):
    assert_states_close(results.state("one", "resumed_mesh1"), results.state("one", "resumed"),
                        atol=1e-6, rtol=1e-6)


def test_single_process_distributed_init(results):
    one = results.facts("one")
    assert one["joined"] is True and one["processes"] == 1


# ------------------------------------------------------------------ in-process, one device
def test_mesh_and_distributed_arguments_are_checked():
    import jax
    assert sharding.make_mesh().devices.size == jax.device_count()
    assert sharding.make_mesh(1).axis_names == (sharding.DATA_AXIS,)
    with pytest.raises(ValueError, match="num_devices"):
        sharding.make_mesh(jax.device_count() + 1)
    with pytest.raises(ValueError, match="empty"):
        sharding.make_mesh(devices=[])
    assert sharding.initialize_distributed("localhost:1", 2, 0, enabled=False) is False
    with pytest.raises(ValueError, match="process_id"):
        sharding.initialize_distributed("localhost:1", 2, 5)
    assert sharding.host_class_slice(7, sharding.make_mesh(1)) == slice(0, 7)


def test_to_host_and_any_host_on_one_process():
    # (Across processes both are exercised by tests/test_multihost.py.)
    import jax
    import jax.numpy as jnp
    tree = {"a": jnp.arange(6.0).reshape(2, 3), "b": (jnp.int32(4), np.ones(2))}
    host = sharding.to_host(tree)
    assert isinstance(host["a"], np.ndarray) and isinstance(host["b"][0], np.ndarray)
    np.testing.assert_array_equal(host["a"], np.arange(6.0).reshape(2, 3))
    assert host["b"][0] == 4 and host["b"][1].tolist() == [1.0, 1.0]
    placed = jax.device_put(np.arange(4.0), sharding.split(sharding.make_mesh(1)))
    np.testing.assert_array_equal(sharding.to_host(placed), np.arange(4.0))
    assert sharding.any_host(True) is True and sharding.any_host(False) is False
    sharding.sync_hosts("one process: returns at once")
