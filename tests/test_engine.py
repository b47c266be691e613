"""The engine: image updates, real-data sampling, init, descent, compile once."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import idm_jax
from idm_jax import image_update, matching, methods
from idm_jax import config as config_lib
from idm_jax import engine as engine_lib
from idm_jax import real as real_lib
from idm_jax import presets


def tiny_config(**overrides):
    base = config_lib.Config(
        dataset="cifar10", ipc=2, model="ConvNetW32", iterations=6, batch_real=8, trained_bs=8,
        model_train_steps=2, net_num=4, net_generate_interval=2, eval_interval=3, num_eval=2,
        epoch_eval_train=2, batch_train=16, eval_every=0, checkpoint_every=3)
    return dataclasses.replace(base, **overrides)


def tiny_data(num_classes=3, per_class=10, size=8, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    rng.shuffle(labels)
    # Class-dependent brightness so there is something to learn.
    images = rng.integers(0, 120, size=(len(labels), size, size, channels))
    images = (images + 60 * labels[:, None, None, None]).clip(0, 255).astype(np.uint8)
    return images, labels


MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


# ------------------------------------------------------------------ the image optimiser
def quadratic_class_losses(num_classes, ipc, shape, seed=0):
    rng = np.random.default_rng(seed)
    targets = jnp.asarray(rng.normal(size=(num_classes, ipc) + shape), jnp.float32)
    scales = jnp.asarray(rng.uniform(0.5, 2.0, size=num_classes), jnp.float32)

    def loss(c, xc):  # non-linear, different for every class
        return scales[c] * jnp.sum((xc - targets[c]) ** 2) + jnp.sum(jnp.sin(3 * xc))

    return loss


@pytest.mark.parametrize("num_classes, mu", [(1, 0.5), (4, 0.5), (10, 0.5), (5, 0.0), (3, 0.9)])
def test_closed_form_per_class_update_equals_sequential_scan(num_classes, mu):
    ipc, shape, lr = 2, (4, 4, 3), 0.2
    loss = quadratic_class_losses(num_classes, ipc, shape)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(num_classes, ipc) + shape), jnp.float32)
    buf = jnp.asarray(rng.normal(size=(num_classes, ipc) + shape), jnp.float32)

    class_grad = lambda c, xc: jax.grad(loss, argnums=1)(c, xc)
    want_x, want_buf = jax.jit(lambda x, b: image_update.sequential_image_update(
        x, b, class_grad, lr, mu))(x, buf)

    def grad_at(xs):
        return jax.vmap(class_grad)(jnp.arange(num_classes), xs), None

    got_x, got_buf, _ = jax.jit(lambda x, b: image_update.per_class_image_update(
        x, b, grad_at, lr, mu))(x, buf)
    np.testing.assert_allclose(np.asarray(got_x), np.asarray(want_x), atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_buf), np.asarray(want_buf), atol=1e-5)


def test_per_class_update_differs_from_summed_step():
    # The official per-class stepping is a different optimiser from DM's single summed step.
    num_classes, ipc, shape, lr, mu = 3, 1, (2, 2, 1), 0.2, 0.5
    loss = quadratic_class_losses(num_classes, ipc, shape)
    x = jnp.ones((num_classes, ipc) + shape)
    buf = jnp.ones_like(x)
    class_grad = lambda c, xc: jax.grad(loss, argnums=1)(c, xc)
    seq_x, _ = image_update.sequential_image_update(x, buf, class_grad, lr, mu)
    grads = jax.vmap(class_grad)(jnp.arange(num_classes), x)
    summed_x = x - lr * (mu * buf + grads)
    assert float(jnp.max(jnp.abs(seq_x - summed_x))) > 1e-3


# ------------------------------------------------------------------ real data and sampling
def test_prepare_real_layout_and_errors():
    images, labels = tiny_data(num_classes=3, per_class=5)
    labels[:2] = 0  # unequal class sizes
    real = real_lib.prepare_real(images, labels, MEAN, STD)
    counts = np.bincount(labels, minlength=3)
    np.testing.assert_array_equal(np.asarray(real.counts), counts)
    per_class = np.asarray(real.per_class)
    for k in range(3):
        np.testing.assert_array_equal(per_class[k, :counts[k]], images[labels == k])
    assert len(real.flat_index) == len(labels)
    with pytest.raises(ValueError, match="uint8"):
        real_lib.prepare_real(images.astype(np.float32), labels, MEAN, STD)
    with pytest.raises(ValueError, match="no images"):
        real_lib.prepare_real(images, np.where(labels == 1, 0, labels), MEAN, STD, num_classes=3)
    with pytest.raises(ValueError, match="must lie in"):
        real_lib.prepare_real(images, labels, MEAN, STD, num_classes=2)


def test_class_batches_are_distinct_valid_and_cover_small_classes():
    counts = jnp.array([7, 3, 12])
    idx, mask = jax.jit(real_lib.class_batch_indices, static_argnums=(2, 3))(
        jax.random.PRNGKey(0), counts, 12, 5)
    idx, mask = np.asarray(idx), np.asarray(mask)
    for k, n in enumerate([7, 3, 12]):
        chosen = idx[k][mask[k]]
        assert len(chosen) == min(5, n)
        assert len(set(chosen.tolist())) == len(chosen)     # without replacement
        assert (chosen < n).all()                           # never padding rows
    assert sorted(idx[1][mask[1]].tolist()) == [0, 1, 2]    # whole class when it is small
    first, _ = real_lib.class_batch_indices(None, counts, 12, 4, "first")
    np.testing.assert_array_equal(np.asarray(first), np.tile(np.arange(4), (3, 1)))


def test_whole_set_batches_are_distinct_labelled_and_uniform():
    # Uneven classes (padding rows in per_class): 4 + 9 + 7 = 20 images, batches of 5.
    labels = np.repeat(np.arange(3), [4, 9, 7])
    images = np.arange(20, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 1), np.uint8)
    real = real_lib.prepare_real(images, labels, [0.0], [1.0 / 255.0])
    draw = jax.jit(jax.vmap(lambda k: real_lib.sample_all_classes(real, k, 5)))
    x, y = draw(jax.random.split(jax.random.PRNGKey(0), 4000))
    ids = np.asarray(x)[:, :, 0, 0, 0].round().astype(int)     # pixel value = image id
    assert all(len(set(row)) == 5 for row in ids.tolist())       # without replacement
    np.testing.assert_array_equal(np.asarray(y), labels[ids])    # labels of those images
    # Uniform subsets in random order: every image is drawn with probability 5/20 and is the
    # first of a batch with probability 1/20 (binomial standard errors about 0.007 and 0.0034).
    included = np.bincount(ids.ravel(), minlength=20) / 4000
    first = np.bincount(ids[:, 0], minlength=20) / 4000
    assert np.abs(included - 0.25).max() < 0.03, included
    assert np.abs(first - 0.05).max() < 0.015, first

def test_mosaic_init_tiles_pooled_real_images_of_the_class():
    images, labels = tiny_data()
    real = real_lib.prepare_real(images, labels, MEAN, STD)
    config = tiny_config(ipc=2)
    syn = np.asarray(engine_lib.init_synthetic(jax.random.PRNGKey(3), config, real))
    assert syn.shape == (3 * 2, 8, 8, 3)
    normalised = (images / 255.0 - np.array(MEAN)) / np.array(STD)
    for row in range(6):
        k = row // 2
        for (r, c) in [(0, 0), (4, 0), (0, 4), (4, 4)]:
            quadrant = syn[row, r:r + 4, c:c + 4]
            candidates = normalised[labels == k].reshape(-1, 4, 2, 4, 2, 3).mean(axis=(2, 4))
            err = np.abs(candidates - quadrant).max(axis=(1, 2, 3)).min()
            assert err < 1e-5, (row, r, c)  # every quadrant is a pooled image of its class
    with pytest.raises(ValueError, match="only"):
        engine_lib.init_synthetic(jax.random.PRNGKey(0), tiny_config(ipc=11), real)


# ------------------------------------------------------------------ the iteration
def make(config, seed=0):
    images, labels = tiny_data()
    real = real_lib.prepare_real(images, labels, MEAN, STD)
    engine = engine_lib.make_engine(config, real.num_classes, real.image_shape)
    return engine, real, engine_lib.init_state(engine, real, seed)


def test_a_gradient_step_on_the_class_objectives_lowers_them():
    config = tiny_config(dsa_strategy="none", syn_ce=False, model_train_steps=0, lr_img=0.05)
    engine, real, state = make(config)
    params = jax.tree.map(lambda x: x[0], state.extractors.params)
    pixels = np.asarray(real.per_class)[:, :8]
    real_x = (pixels / 255.0 - np.array(MEAN)) / np.array(STD)
    feats = jax.vmap(lambda x: engine.apply(params, x)[0])(jnp.asarray(real_x, jnp.float32))
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    shape = (3, config.ipc) + real.image_shape
    layout = idm_jax.accel.sharding.ClassLayout(3)
    mask = jnp.ones((3, 8), bool)

    def loss(images):
        per_class, _ = matching.class_objectives(engine, params, images.reshape(shape), feats,
                                                 mask, keys, 0.0, layout)
        return jnp.sum(per_class)

    x0 = state.images
    before = float(loss(x0))
    grads = jax.grad(loss)(x0)
    after = float(loss(x0 - 0.05 * grads))
    assert after < before


def test_steps_with_a_fixed_extractor_decrease_the_matching_loss():
    # One queue model that never trains or changes, the same real batch every iteration
    # (the first 8 images of each class, all of them) and no augmentation: the loss each step
    # reports is the loss at the images the previous step produced, so it must go down.
    config = tiny_config(dsa_strategy="none", syn_ce=False, model_train_steps=0, lr_img=0.3,
                         net_num=1, initial_models=1, net_push_num=0, fetch_net_num=1,
                         real_sampling="first",
                         iterations=6)
    engine, real, state = make(config)
    step = engine_lib.make_step(engine, real)
    losses = []
    for _ in range(6):
        state, metrics = step(state, real)
        losses.append(float(metrics["loss"]))
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.95 * losses[0], losses


def test_iteration_runs_compiles_once_and_keeps_shapes():
    config = tiny_config(iterations=5)
    engine, real, state = make(config)
    raw = engine_lib.make_step(engine, real, jit=False)
    step = jax.jit(chex.assert_max_traces(raw, n=1), donate_argnums=0)
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    for _ in range(5):
        state, metrics = step(state, real)
        assert np.isfinite(float(metrics["loss"]))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == shapes
    assert int(state.iteration) == 5
    # pushes at it 0, 2, 4 on top of 3 initial models, capacity 4
    assert int(idm_jax.queue.size(state.extractors)) == 4
    assert int(state.extractors.pushed) == 6


def test_meters_reset_every_eval_interval():
    config = tiny_config(eval_interval=3, net_generate_interval=100, iterations=4)
    engine, real, state = make(config)
    step = engine_lib.make_step(engine, real)
    seen = []
    for _ in range(4):
        state, _ = step(state, real)
        seen.append(float(jnp.sum(state.extractors.seen)))
    per_it = config.fetch_net_num * config.model_train_steps * config.trained_bs
    # it 0,1,2 accumulate; it 3 resets first, then trains again.
    assert seen == [per_it, 2 * per_it, 3 * per_it, per_it]


def test_microbatched_step_equals_the_whole_batch_step():
    # Chunks of 3 images (and 8 for the 16 synthetic views) against whole batches: same
    # values up to float32 summation order, over iterations with pushes and queue training.
    states = {}
    for chunk in (0, 3):
        engine, real, state = make(tiny_config(iterations=3, microbatch=chunk))
        assert engine.policy.chunk == chunk
        step = engine_lib.make_step(engine, real)
        for _ in range(3):
            state, _ = step(state, real)
        states[chunk] = state
    chex.assert_trees_all_close(states[3].images, states[0].images, atol=2e-4, rtol=1e-4)
    chex.assert_trees_all_close(states[3].extractors.params, states[0].extractors.params, atol=2e-4,
                                rtol=1e-4)
    np.testing.assert_array_equal(states[3].extractors.seen, states[0].extractors.seen)


def test_summed_update_equals_per_class_for_one_class_and_the_sgd_formula():
    # With one class the official per-class loop is a single step on the whole tensor, so the
    # two updates must coincide, and both must be PyTorch's SGD-momentum written by hand:
    # buf <- mu * buf + g, x <- x - lr * buf.
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(1, 2, 4, 4, 3)), jnp.float32)
    buf = jnp.asarray(rng.normal(size=(1, 2, 4, 4, 3)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(1, 2, 4, 4, 3)), jnp.float32)
    loss = lambda v: jnp.sum((v - target) ** 2) + jnp.sum(jnp.sin(3 * v))
    grad_at = lambda v: (jax.grad(loss)(v), ())
    lr, mu = 0.2, 0.5
    g = np.asarray(jax.grad(loss)(x))
    want_buf = mu * np.asarray(buf) + g
    want_x = np.asarray(x) - lr * want_buf
    for update in (image_update.summed_image_update, image_update.per_class_image_update):
        got_x, got_buf, _ = update(x, buf, grad_at, lr, mu)
        np.testing.assert_allclose(got_x, want_x, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got_buf, want_buf, rtol=1e-6, atol=1e-6)


def test_summed_update_option_steps_the_images_like_dm():
    # Through the engine, from zero momentum: the buffer after one summed step is the gradient
    # and the images moved by exactly -lr times it (the per-class closed form would move a
    # class's rows on by momentum after its step, so its buffer is not this).
    config = tiny_config(image_update="summed", iterations=2)
    engine, real, state = make(config)
    start = np.asarray(state.images)
    state, metrics = engine_lib.make_step(engine, real)(state, real)
    assert np.isfinite(float(metrics["loss"]))
    moved = (start - np.asarray(state.images)) / config.lr_img
    assert np.abs(moved).max() > 0
    np.testing.assert_allclose(np.asarray(state.image_opt_state), moved, rtol=1e-3, atol=1e-5)


def test_dm_draws_a_fresh_untrained_extractor_every_iteration():
    config = methods.with_method(tiny_config(iterations=3), "dm")
    engine, real, state = make(config)
    step = engine_lib.make_step(engine, real)
    extractors = []
    for it in range(3):
        state, metrics = step(state, real)
        assert float(metrics["ce_scale"]) == 0.0 and float(metrics["trainee_acc"]) == 0.0
        extractors.append(np.asarray(jax.tree.leaves(state.extractors)[0]))
    assert not np.array_equal(extractors[0], extractors[1])
    assert not np.array_equal(extractors[1], extractors[2])


def test_dm_fresh_schedule_equals_a_one_slot_queue_pushed_every_iteration():
    # The reference: DM as the engine ran it before methods, a queue of one model replaced every
    # iteration and never trained, with DM's optimiser. Same keys, so the same images to the bit.
    dm = methods.with_method(tiny_config(iterations=3), "dm")
    queue_dm = dataclasses.replace(presets.without_components(dm), method="idm")
    assert queue_dm.net_num == 1 and queue_dm.model_train_steps == 0
    runs = []
    for config in (dm, queue_dm):
        engine, real, state = make(config)
        step = engine_lib.make_step(engine, real)
        losses = []
        for _ in range(3):
            state, metrics = step(state, real)
            losses.append(float(metrics["loss"]))
        runs.append((np.asarray(state.images), np.asarray(state.image_opt_state), losses))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert runs[0][2] == runs[1][2]


def test_condense_entry_point_is_reproducible_from_the_seed():
    images, labels = tiny_data()
    config = tiny_config(iterations=3)
    out_a, _ = idm_jax.condense(config, images, labels, mean=MEAN, std=STD)
    out_b, _ = idm_jax.condense(config, images, labels, mean=MEAN, std=STD)
    np.testing.assert_array_equal(out_a.images, out_b.images)
    np.testing.assert_array_equal(out_a.labels, np.repeat(np.arange(3), 2))
    out_c, _ = idm_jax.condense(dataclasses.replace(config, seed=1), images, labels, mean=MEAN,
                                std=STD)
    assert not np.array_equal(out_a.images, out_c.images)


def test_factor_3_on_8_pixels_inits_condenses_and_evaluates_on_the_uneven_grid():
    # 8 pixels in 3 pieces: cuts (0, 3, 5, 8), pieces of 3, 2, 3 rows and columns.
    from idm_jax import evaluation
    from tests.test_partition import numpy_area_resize
    config = tiny_config(partition_factor=3, ipc=1, iterations=2)
    engine, real, state = make(config)
    images, labels = tiny_data()
    normalised = (images / 255.0 - np.array(MEAN)) / np.array(STD)
    syn = np.asarray(state.images)
    bounds = [(0, 3), (3, 5), (5, 8)]
    for row in range(3):                        # class k = row (ipc 1)
        for c0, c1 in bounds:
            for r0, r1 in bounds:
                piece = syn[row, r0:r1, c0:c1]
                candidates = [numpy_area_resize(x, r1 - r0, c1 - c0)
                              for x in normalised[labels == row]]
                err = min(np.abs(c - piece).max() for c in candidates)
                assert err < 1e-5, (row, r0, c0)  # each piece: one real image of the class
    step = jax.jit(chex.assert_max_traces(engine_lib.make_step(engine, real, jit=False), n=1))
    for _ in range(2):
        state, metrics = step(state, real)
        assert np.isfinite(float(metrics["loss"]))
    assert not np.allclose(np.asarray(state.images), syn)        # the uneven pieces get gradients
    result = evaluation.evaluate_synset(
        jax.random.PRNGKey(0), state.images, jnp.arange(3), normalised, labels, model="ConvNetW32",
        num_models=1, epochs=1, batch_size=16, partition_factor=3)
    assert 0.0 <= result["mean"] <= 100.0 and len(result["accuracies"]) == 1
