"""The method protocol: image optimisers and extractor schedules against their definitions, a
method from a user's file through the real command line, and custom pieces through the run."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from idm_jax import data, engine as engine_lib, extractors, image_update, losses, methods, validate
from idm_jax.runs import checkpoint, run
from idm_jax import config as config_lib
from idm_jax import real as real_lib
from idm_jax.base import Method, Networks
from idm_jax import presets
from tests.test_experiments import write_npy_cifar

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join("examples", "dm_adam.py")


# ------------------------------------------------------------------ image optimisers
def test_per_class_sgd_equals_the_official_loop_of_class_steps():
    # The protocol's two halves (where the gradient is taken, then the step) against the plain
    # loop: one PyTorch SGD step per class in class order over the whole tensor.
    rng = np.random.default_rng(0)
    num_classes, ipc, lr, mu = 3, 2, 0.2, 0.5
    x = jnp.asarray(rng.normal(size=(num_classes * ipc, 4, 4, 1)), jnp.float32)
    buf = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    target = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    per_class_target = target.reshape(num_classes, ipc, 4, 4, 1)

    def class_loss(c, rows):        # class c's loss depends on its own rows only
        return jnp.sum((rows - per_class_target[c]) ** 2 * (c + 1)) + jnp.sum(jnp.sin(3 * rows))

    opt = image_update.per_class_sgd(lr, mu, num_classes)
    point = opt.grad_point(buf, x)
    rows = point.reshape(num_classes, ipc, 4, 4, 1)
    grads = jnp.stack([jax.grad(lambda r, c=c: class_loss(c, r))(rows[c])
                       for c in range(num_classes)]).reshape(x.shape)
    got_x, got_buf = opt.update(grads, buf, x, jnp.float32(0.0))
    want_x, want_buf = image_update.sequential_image_update(
        x.reshape(num_classes, ipc, 4, 4, 1), buf.reshape(num_classes, ipc, 4, 4, 1),
        lambda c, rows: jax.grad(lambda r: class_loss(c, r))(rows), lr, mu)
    np.testing.assert_allclose(got_x, want_x.reshape(x.shape), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_buf, want_buf.reshape(x.shape), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(opt.init(x), np.zeros(x.shape, np.float32))


def test_pixel_space_sgd_is_m3ds_loop_of_class_steps_on_clamped_pixels():
    # M3D's code, transcribed in NumPy: pixels in [0, 1], clamped where each iteration starts,
    # then one SGD-momentum step per class over the whole tensor, the network fed
    # (pixels - mean) / std. The engine's images are normalised; the wrapper must give the same.
    rng = np.random.default_rng(2)
    num_classes, ipc, lr, mu, iterations = 3, 2, 0.05, 0.5, 3
    mean, std = np.array([0.5, 0.4, 0.3]), np.array([0.2, 0.25, 0.3])
    pixels = rng.uniform(-0.2, 1.2, size=(num_classes * ipc, 2, 2, 3))   # some outside [0, 1]
    target = rng.normal(size=pixels.shape)

    def class_grad_pixels(c, p):     # d/dp of sum(w_c * ((p - mean)/std - t)^2) on class rows
        rows = slice(c * ipc, (c + 1) * ipc)
        g = np.zeros_like(p)
        g[rows] = 2 * (c + 1) * ((p[rows] - mean) / std - target[rows]) / std
        return g

    want, buf = pixels.copy(), np.zeros_like(pixels)
    for _ in range(iterations):
        want = np.clip(want, 0, 1)
        for c in range(num_classes):
            buf = mu * buf + class_grad_pixels(c, want)
            want = want - lr * buf

    opt = image_update.in_pixel_space(image_update.per_class_sgd(lr, mu, num_classes),
                                      mean, std)
    x = jnp.asarray((pixels - mean) / std, jnp.float32)
    state = opt.init(x)
    weights = jnp.repeat(jnp.arange(1.0, num_classes + 1), ipc).reshape(-1, 1, 1, 1)
    for _ in range(iterations):
        point = opt.grad_point(state, x)
        grads = 2 * weights * (point - target)         # the gradient in normalised units
        x, state = opt.update(grads, state, x, jnp.float32(0.0))
    np.testing.assert_allclose(np.asarray(x) * std + mean, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(state), buf, rtol=1e-4, atol=1e-4)


def test_per_class_adamw_steps_are_pytorchs_adamw_stepped_after_each_class():
    # NCFM's loop, transcribed: one torch.optim.AdamW over the whole tensor, step() after each
    # class's loss, so other classes' rows move by their moments and decay, and the step count
    # advances per class. The class gradient is taken where its rows stand at its own step.
    rng = np.random.default_rng(5)
    num_classes, ipc, lr, wd, b1, b2, eps = 3, 2, 0.05, 5e-4, 0.9, 0.999, 1e-8
    x0 = rng.normal(size=(num_classes * ipc, 2, 2, 1))
    target = rng.normal(size=x0.shape)
    weight = np.repeat(np.arange(1.0, num_classes + 1), ipc).reshape(-1, 1, 1, 1)

    def class_grad(c, p):
        g = np.zeros_like(p)
        rows = slice(c * ipc, (c + 1) * ipc)
        g[rows] = 2 * weight[rows] * (np.sin(p[rows]) - target[rows]) * np.cos(p[rows])
        return g

    p, m, v, t = x0.copy(), np.zeros_like(x0), np.zeros_like(x0), 0
    for _ in range(2):
        for c in range(num_classes):
            g = class_grad(c, p)
            t += 1
            p = p * (1 - lr * wd)
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            p = p - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)

    opt = image_update.per_class_steps(optax.adamw(lr, b1, b2, eps, weight_decay=wd),
                                       num_classes)
    x = jnp.asarray(x0, jnp.float32)
    state = opt.init(x)
    for _ in range(2):
        point = np.asarray(opt.grad_point(state, x), np.float64)
        grads = sum(class_grad(c, point) for c in range(num_classes))   # each at its own rows
        x, state = opt.update(jnp.asarray(grads, jnp.float32), state, x, jnp.float32(0.0))
    np.testing.assert_allclose(np.asarray(x), p, rtol=1e-4, atol=1e-5)


def test_plateau_halves_the_rate_after_patience_iterations_without_a_relative_gain():
    # PyTorch's ReduceLROnPlateau(mode min, factor 0.5, patience 2, threshold 1e-4 rel),
    # stepped once per iteration of 2 passes with the iteration's loss averaged over 2 classes.
    values = [4.0, 3.0, 3.0, 2.9999, 3.0, 2.0, 2.0, 2.0, 2.0, 1.0]    # per iteration, mean
    lr, best, bad, want = 1.0, np.inf, 0, []
    for value in values:
        want.append(lr)                     # the rate of this iteration
        if value < best * (1 - 1e-4):
            best, bad = value, 0
        else:
            bad += 1
        if bad > 2:
            lr, bad = lr * 0.5, 0
    opt = image_update.with_plateau(lambda rate: image_update.from_optax(optax.sgd(rate)), 1.0,
                                    num_classes=2, passes_per_iteration=2, factor=0.5,
                                    patience=2)
    x = jnp.zeros((2, 1, 1, 1))
    state, got = opt.init(x), []
    for value in values:
        for part in (0.25, 0.75):           # two passes; their sums add up to 2 classes x mean
            moved, state = opt.update(jnp.ones_like(x), state, x, jnp.float32(2 * value * part))
            rate = float(x[0, 0, 0, 0] - moved[0, 0, 0, 0])
        got.append(rate)
    np.testing.assert_allclose(got, want)
    assert want[-1] < 1.0


def test_optax_sgd_is_dms_summed_step_and_adam_is_adam():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 3, 3, 1)), jnp.float32)
    g1, g2 = (jnp.asarray(rng.normal(size=x.shape), jnp.float32) for _ in range(2))
    summed, sgd = image_update.summed_sgd(1.0, 0.5), image_update.from_optax(
        optax.sgd(1.0, momentum=0.5))
    a, sa = x, summed.init(x)
    b, sb = x, sgd.init(x)
    for g in (g1, g2):
        a, sa = summed.update(g, sa, a, jnp.float32(0.0))
        b, sb = sgd.update(g, sb, b, jnp.float32(0.0))
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # Adam's first step by its definition: m/(sqrt(v)+eps) with bias correction = sign(g).
    adam = image_update.from_optax(optax.adam(0.01))
    stepped, _ = adam.update(g1, adam.init(x), x, jnp.float32(0.0))
    np.testing.assert_allclose(stepped, x - 0.01 * np.sign(g1), rtol=1e-5, atol=1e-6)


def test_reduce_on_plateau_reads_the_loss_it_is_given():
    opt = image_update.from_optax(optax.chain(
        optax.sgd(1.0), optax.contrib.reduce_on_plateau(factor=0.5, patience=1, cooldown=0,
                                                        accumulation_size=1)))
    x = jnp.ones((2, 1, 1, 1))
    g = jnp.ones_like(x)
    state = opt.init(x)
    moves = []
    for value in (1.0, 1.0, 1.0, 1.0):      # a loss that never improves: the step is halved
        new, state = opt.update(g, state, x, jnp.float32(value))
        moves.append(float((x - new)[0, 0, 0, 0]))
    assert moves[0] == 1.0 and moves[-1] < moves[0], moves


# ------------------------------------------------------------------ extractor schedules
def tiny_networks():
    w_shape = (3, 2)

    def init_params(key):
        return {"w": jax.random.normal(key, w_shape)}

    def apply(params, images):
        flat = images.reshape(images.shape[0], -1)[:, :3]
        return flat @ params["w"], flat @ params["w"]

    return Networks(init_params, apply, optax.sgd(0.1), False, 0)


@pytest.mark.parametrize("every", [1, 5])
def test_fresh_schedule_draws_a_new_untrained_network_exactly_every_k_iterations(every):
    nets = tiny_networks()
    schedule = extractors.fresh_schedule(nets, every)
    state = schedule.init(jax.random.PRNGKey(0))
    refresh = jax.jit(schedule.refresh)          # one compile for the twelve calls
    key = jax.random.PRNGKey(1)
    previous = None
    for it in range(12):
        key, k_refresh, k_draw = jax.random.split(key, 3)
        state = refresh(state, jnp.int32(it), k_refresh)
        params, accuracy = schedule.draw(state, k_draw)
        state, metrics = schedule.train(state, None, None, k_draw, k_draw)
        assert float(accuracy) == 0.0 and float(metrics["trainee_acc"]) == 0.0
        if it % every == 0:        # a new network: the init of this iteration's key
            want = nets.init_params(jax.random.split(k_refresh, 1)[0])["w"]
            np.testing.assert_array_equal(params["w"], want)
        else:                      # the same network as the iteration before, untouched
            np.testing.assert_array_equal(params["w"], previous)
        previous = np.asarray(params["w"])


def test_pool_schedule_draws_pool_members_interpolated_from_their_start():
    nets = tiny_networks()
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    pool = jax.vmap(nets.init_params)(keys)            # 4 "trained" networks
    start = jax.vmap(nets.init_params)(keys[::-1])     # and where each one started
    exact = extractors.pool_schedule(pool, accuracy=[10.0, 20.0, 30.0, 40.0])
    mixed = extractors.pool_schedule(pool, start, mix=(0.25, 0.25))
    state_exact, state_mixed = exact.init(keys[0]), mixed.init(keys[0])
    drawn = set()
    for i in range(40):
        key = jax.random.PRNGKey(100 + i)
        params, accuracy = exact.draw(state_exact, key)
        index = [j for j in range(4) if np.array_equal(params["w"], pool["w"][j])]
        assert len(index) == 1 and float(accuracy) == 10.0 * (index[0] + 1)
        drawn.add(index[0])
        # The same key picks the same member; a quarter of the way from its start to it.
        mix_params, _ = mixed.draw(state_mixed, key)
        want = start["w"][index[0]] + 0.25 * (pool["w"][index[0]] - start["w"][index[0]])
        np.testing.assert_allclose(mix_params["w"], want, rtol=1e-6, atol=1e-7)
    assert drawn == {0, 1, 2, 3}
    # Never trained: train and refresh leave the pool as it is.
    after, _ = exact.train(exact.refresh(state_exact, jnp.int32(5), keys[1]), None, None,
                           keys[1], keys[2])
    np.testing.assert_array_equal(after["pool"]["w"], pool["w"])


# ------------------------------------------------------------------ the registry
def test_method_specs_resolve_and_bad_ones_name_the_problem(tmp_path):
    assert methods.get("idm") is methods.METHODS["idm"]
    assert methods.get(EXAMPLE + ":DM_ADAM").name == "dm-adam-fresh5"
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    empty = tmp_path / "empty.py"
    empty.write_text("X = 1\n")
    for spec, message in ((str(broken), "loading the file failed: RuntimeError: boom"),
                          (f"{empty}:X", "defines no idm_jax.base.Method called X"),
                          (f"{empty}", "defines no idm_jax.base.Method called METHOD")):
        config = config_lib.Config(method=spec)
        with pytest.raises(validate.InvalidRun, match=message):
            validate.check_method(config)
    provenance = methods.provenance(EXAMPLE + ":DM_ADAM")
    assert provenance["method_file"] == os.path.abspath(EXAMPLE)
    with open(EXAMPLE, "rb") as f:
        assert provenance["method_sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert methods.provenance("dm") == {}


# ------------------------------------------------------------------ custom pieces in a run
def test_adam_and_a_fresh_extractor_run_through_condense_and_evaluate(tmp_path):
    dataset = data.load_dataset("digits")
    custom = Method(
        name="mean-match-adam", description="test",
        objective=lambda c: methods.METHODS["idm"].objective(c),
        image_optimizer=lambda c, k: image_update.from_optax(optax.adam(c.lr_img)),
        extractors=lambda c, nets: extractors.fresh_schedule(nets, every=2),
        defaults={})
    config = config_lib.override(presets.get_preset("digits-ipc1"), {
        "iterations": 4, "num_eval": 1, "epoch_eval_train": 1, "lr_img": 0.01,
        "checkpoint_every": 2})
    workdir = str(tmp_path / "run")
    results = run.condense_and_evaluate(config, dataset, workdir, method=custom, quiet=True)
    assert results["iterations"] == 4 and results["method"] == {"name": "mean-match-adam"}
    assert results["config"]["method"] == "mean-match-adam"
    # The checkpoint holds Adam's state (count, mu, nu) beside the images, and it resumes.
    real = real_lib.prepare_real(dataset.train_images, dataset.train_labels, dataset.mean,
                                 dataset.std)
    eng = engine_lib.make_engine(results_config(results), real.num_classes, real.image_shape,
                                 method=custom)
    state = engine_lib.init_state(eng, real, 0)
    counts = [leaf for leaf in jax.tree.leaves(state.image_opt_state) if leaf.ndim == 0]
    assert counts, "Adam's step count is part of the state"
    # Adam moves a pixel by about lr per step (never more than lr * (1 - b1) / sqrt(1 - b2)
    # = 3.2 lr): the set left the init, by Adam-sized steps.
    saved = np.load(os.path.join(workdir, "synthetic.npz"))["images_normalized"]
    moved = np.abs(saved - np.asarray(state.images))
    assert 0.01 <= moved.max() <= 4 * 0.01 * 3.2


def results_config(results):
    return config_lib.Config.from_dict(results["config"])


# ------------------------------------------------------------------ a method file, real CLI
def command(workdir, data_dir, method, iterations=60):
    return [sys.executable, "-m", "experiments.cifar10", "--ipc", "1", "--source", "npy",
            "--data_dir", data_dir, "--workdir", workdir, "--method", method, "--smoke",
            "--iterations", str(iterations), "--checkpoint_every", "1000", "--num_eval", "1",
            "--epoch_eval_train", "1", "--batch_real", "8", "--quiet"]


def test_a_method_file_condenses_stops_on_sigterm_resumes_exactly_and_exports(tmp_path):
    data_dir = str(tmp_path / "npy")
    write_npy_cifar(data_dir)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    spec = EXAMPLE + ":DM_ADAM"
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    reference = subprocess.Popen(command(straight, data_dir, spec), cwd=REPO, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.Popen(command(stopped, data_dir, spec), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = os.path.join(stopped, "metrics.jsonl")
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not (
            os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)        # a scheduler's preemption: a stop like Ctrl-C
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143 and "SIGTERM: stopped at iteration" in output, output
    assert "checkpoint saved" in output and "Traceback" not in output

    # Another method in the same workdir is refused, with the difference named.
    other = subprocess.run(command(stopped, data_dir, "idm"), cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert other.returncode == 2, other.stdout + other.stderr
    assert f"method: '{spec}' -> 'idm'" in other.stderr and "Traceback" not in other.stderr

    resumed = subprocess.run(command(stopped, data_dir, spec), cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and "resuming from iteration" in resumed.stdout, (
        resumed.stdout + resumed.stderr)
    out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, out
    a = np.load(os.path.join(stopped, "synthetic.npz"))["images_normalized"]
    b = np.load(os.path.join(straight, "synthetic.npz"))["images_normalized"]
    np.testing.assert_array_equal(a, b)
    with open(os.path.join(stopped, "results.json")) as f:
        results = json.load(f)
    assert results["method"]["name"] == spec
    assert results["method"]["method_file"] == os.path.abspath(os.path.join(REPO, EXAMPLE))
    assert results["config"]["lr_img"] == 0.01 and not results["config"]["partition_expand"]
    for name in ("synthetic_expanded.npz", "synthetic.png", "dd_ranking/images.pt"):
        assert os.path.exists(os.path.join(stopped, name)), name
    assert len(results["accuracies"]) == 1 and 0 <= results["mean"] <= 100   # evaluated


def test_an_edited_method_file_is_refused_on_resume(tmp_path):
    mine = tmp_path / "mine.py"
    shutil.copy(os.path.join(REPO, EXAMPLE), mine)
    dataset = data.load_dataset("digits")
    base = config_lib.override(presets.get_preset("digits-ipc1"), {
        "iterations": 2, "num_eval": 1, "epoch_eval_train": 0, "exports": "npz"})
    config = methods.with_method(base, f"{mine}:DM_ADAM")
    workdir = str(tmp_path / "run")
    first = run.condense_and_evaluate(config, dataset, workdir, quiet=True)
    assert first["method"]["method_sha256"] == methods.provenance(config.method)["method_sha256"]
    mine.write_text(mine.read_text().replace("every=5", "every=3"))
    longer = config_lib.override(config, {"iterations": 4})
    with pytest.raises(checkpoint.CheckpointMismatchError, match="method_sha256"):
        run.condense_and_evaluate(longer, dataset, workdir, quiet=True)


def test_smoke_method_dm_on_the_command_line_is_dm():
    from idm_jax.runs import cli
    _, smoke_dm = cli.parse(["--smoke", "--method", "dm"], "cifar10", 10)
    _, full_dm = cli.parse(["--method", "dm"], "cifar10", 10)
    for field in ("method", "image_update", "lr_img", "img_momentum", "net_generate_interval",
                  "partition_expand", "init", "syn_ce"):
        assert getattr(smoke_dm, field) == getattr(full_dm, field), field
    assert (smoke_dm.net_generate_interval, smoke_dm.image_update) == (1, "summed")
    _, alias = cli.parse(["--smoke", "--dm"], "cifar10", 10)
    assert alias == smoke_dm
    args, _ = cli.parse(["--method", "dm"], "cifar10", 10)
    assert args.workdir == os.path.join("runs", "cifar10-ipc10-dm")
    with pytest.raises(cli.UserError, match="--dm and --method idm name two methods"):
        cli.parse(["--dm", "--method", "idm"], "cifar10", 10)
    with pytest.raises(cli.UserError, match="--no_components is an ablation of IDM"):
        cli.parse(["--method", "dm", "--no_components"], "cifar10", 10)


# ------------------------------------------------------------------ M3D
def test_m3d_is_its_codes_loss_pixel_sgd_fresh_extractor_every_5_and_idc_augmentation():
    config = methods.with_method(presets.get_preset("cifar10-ipc1"), "m3d")
    assert (config.lr_img, config.img_momentum, config.image_update, config.batch_real,
            config.net_generate_interval, config.syn_ce, config.partition_factor) == (
        5e-3, 0.5, "per_class", 128, 5, False, 2)
    # IDC's colour + crop + cutout while matching, the common DSA in evaluation.
    assert (config.matching_dsa, config.dsa_strategy) == (
        "color+crop+cutout", "color_crop_cutout_flip_scale_rotate")
    method = methods.get("m3d")
    assert method.pixel_space
    # The objective is M3D's loss alone (losses.m3d_mmd, checked against NumPy in
    # test_objectives): value and gradient, whatever the CE scale says when syn_ce is off.
    rng = np.random.default_rng(4)
    real, syn = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((12, 6), (4, 6)))
    mask = jnp.arange(12) < 9
    logits = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    objective = method.objective(config)
    value = lambda s: objective(real, mask, s, logits, 1, 0.0, jax.random.PRNGKey(0))[0]
    np.testing.assert_allclose(value(syn), losses.m3d_mmd(real, syn, mask), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(value)(syn),
                               jax.grad(lambda s: losses.m3d_mmd(real, s, mask))(syn),
                               rtol=1e-5, atol=1e-7)
    # In a run: a new random extractor at iterations 0, 5, 10, never trained in between.
    dataset = data.load_dataset("digits")
    real_data = real_lib.prepare_real(dataset.train_images, dataset.train_labels, dataset.mean,
                                      dataset.std)
    small = config_lib.override(presets.smoke(methods.with_method(
        presets.get_preset("digits-ipc1"), "m3d")), {"batch_real": 8})
    with pytest.raises(ValueError, match="normalization"):
        engine_lib.make_engine(small, real_data.num_classes, real_data.image_shape)
    eng = engine_lib.make_engine(small, real_data.num_classes, real_data.image_shape,
                                 normalization=(dataset.mean, dataset.std))
    state, step = engine_lib.init_state(eng, real_data, 0), engine_lib.make_step(eng, real_data)
    previous, changed = None, []
    for it in range(11):
        state, _ = step(state, real_data)
        weights = np.asarray(jax.tree.leaves(state.extractors)[0])
        changed.append(previous is None or not np.array_equal(weights, previous))
        previous = weights
    assert [i for i, c in enumerate(changed) if c] == [0, 5, 10]


def test_first_pass_gradient_norms_are_those_of_the_first_step():
    # With DM's summed step at lr 1 and no momentum, iteration 0 moves the images by exactly
    # the gradient of the summed loss: its norm is the recorded "loss" norm. DM has no CE
    # weight, so the loss is the distance alone.
    dataset = data.load_dataset("digits")
    real = real_lib.prepare_real(dataset.train_images, dataset.train_labels, dataset.mean,
                                 dataset.std)
    config = config_lib.override(presets.smoke(methods.with_method(
        presets.get_preset("digits-ipc1"), "dm")), {"batch_real": 8, "img_momentum": 0.0})
    eng = engine_lib.make_engine(config, real.num_classes, real.image_shape)
    state = engine_lib.init_state(eng, real, 0)
    before = np.asarray(state.images)
    norms = engine_lib.first_pass_gradient_norms(eng, real, state)
    after, _ = engine_lib.make_step(eng, real)(state, real)
    moved = np.sqrt(np.sum(np.square(np.asarray(after.images, np.float64) - before)))
    np.testing.assert_allclose(norms["loss"], moved, rtol=1e-4)
    assert norms["mmd"] == norms["loss"] and norms["ce_scale"] == 0.0 and norms["ce"] > 0
