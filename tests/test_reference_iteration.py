"""The jitted outer iteration against a slow, plain reference of the official loop.

The reference is written the way the official script reads: a Python loop over classes, whole
batches, no vmap, no closed form, no chunks, plain convolutions. One SGD step per class on the
whole tensor with the shared momentum buffer; the real and synthetic images of a class share
its DSA key (Siamese); the CE weight is ``ce_weight`` times the drawn extractor's running
accuracy in percent; then the drawn queue models train on real batches and count their hits.
It shares with the engine only the random draws' helpers (``real.class_batch_indices``,
``real.sample_all_classes``, ``queue.sample_slots`` and ``queue.push``, each tested on its own)
and the DSA ops, so what it pins is the wiring: which key goes where, which slot's accuracy
scales CE, the order of the phases, and the update arithmetic.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from idm_jax import augment, partition
from idm_jax.nn import models
from idm_jax import config as config_lib
from idm_jax import engine as engine_lib
from idm_jax import queue as queue_lib
from idm_jax import real as real_lib

MEAN, STD = (0.5, 0.4, 0.45), (0.25, 0.3, 0.2)


def uneven_data(counts=(10, 9, 5), size=8, seed=0):
    """Three classes of unequal size: the smallest has fewer images than batch_real."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(n, k) for k, n in enumerate(counts)])
    rng.shuffle(labels)
    images = rng.integers(0, 150, size=(len(labels), size, size, 3))
    images = (images + 50 * labels[:, None, None, None]).clip(0, 255).astype(np.uint8)
    return images, labels


def reference_iteration(config, model, optimizer, real, state):
    """One outer iteration as the official loop does it. Returns (state, ce scales used)."""
    per_class = np.asarray(real.per_class)
    apply = lambda params, x: model.apply({"params": params}, x)
    init = lambda key: model.init(key, jnp.zeros((1,) + per_class.shape[2:]))["params"]
    it = int(state.iteration)
    key, k_push, k_match, k_trainees, k_train = jax.random.split(state.key, 5)
    queue = state.extractors
    if it > 0 and it % config.eval_interval == 0:
        queue = queue.replace(correct=queue.correct * 0, seen=queue.seen * 0)
    if it % config.net_generate_interval == 0:
        for push_key in jax.random.split(k_push, config.net_push_num):
            queue = queue_lib.push(queue, push_key, init, optimizer)
    x, buf, scales = _reference_matching(config, apply, real, queue, k_match,
                                         np.asarray(state.images).copy(),
                                         np.asarray(state.image_opt_state).copy())
    queue = _reference_queue_training(config, apply, optimizer, real, queue, k_trainees, k_train)
    new = state.replace(images=jnp.asarray(x), image_opt_state=jnp.asarray(buf), extractors=queue,
                        key=key,
                        iteration=state.iteration + 1)
    return new, scales


def _reference_matching(config, apply, real, queue, k_match, x, buf):
    """The official matching phase: per extractor drawn, one SGD-momentum step per class over
    the whole image tensor. Returns (images, momentum buffer, ce scales used)."""
    num_classes, ipc = int(real.counts.shape[0]), config.ipc
    counts, per_class = np.asarray(real.counts), np.asarray(real.per_class)
    mean, std = np.asarray(real.mean), np.asarray(real.std)
    scales = []
    for match_key in jax.random.split(k_match, config.train_net_num):
        k_slot, k_real, k_dsa = jax.random.split(match_key, 3)
        slot = int(queue_lib.sample_slots(queue, k_slot, 1)[0][0])
        params = jax.tree.map(lambda leaf: leaf[slot], queue.params)
        seen, correct = float(queue.seen[slot]), float(queue.correct[slot])
        ce_scale = config.ce_weight * (100.0 * correct / seen if seen > 0 else 0.0)
        scales.append(ce_scale)
        batch = min(config.batch_real, per_class.shape[1])
        idx, _ = real_lib.class_batch_indices(k_real, real.counts, per_class.shape[1], batch)
        dsa_keys = jax.random.split(k_dsa, num_classes)
        for c in range(num_classes):
            rows = np.asarray(idx[c])[:min(batch, counts[c])]     # the class's valid draws
            real_c = (per_class[c][rows] / 255.0 - mean) / std
            real_view = augment.dsa(dsa_keys[c], jnp.asarray(real_c, jnp.float32),
                                    config.dsa_strategy, siamese=True, loop_over_keys=False)
            real_mean = np.asarray(apply(params, real_view)[0]).mean(axis=0)

            def loss(images_c):
                views = augment.dsa(dsa_keys[c], partition.partition_expand(images_c, 2),
                                    config.dsa_strategy, siamese=True, loop_over_keys=False)
                embedding, logits = apply(params, views)
                mmd = jnp.sum((real_mean - jnp.mean(embedding, axis=0)) ** 2)
                ce = -jnp.mean(jax.nn.log_softmax(logits)[:, c])
                return mmd + ce_scale * ce

            rows_c = slice(c * ipc, (c + 1) * ipc)
            g = np.zeros_like(x)
            g[rows_c] = np.asarray(jax.grad(loss)(jnp.asarray(x[rows_c])))
            buf = config.img_momentum * buf + g                  # SGD over the whole tensor
            x = x - config.lr_img * buf
    return x, buf, scales


def _reference_queue_training(config, apply, optimizer, real, queue, k_trainees, k_train):
    """The official queue phase: each drawn extractor takes ``model_train_steps`` SGD steps on
    real batches of all classes and counts its hits. Returns the queue."""
    slots, active = queue_lib.sample_slots(queue, k_trainees, config.fetch_net_num)
    trainee_keys = jax.random.split(k_train, config.fetch_net_num)
    for i in range(config.fetch_net_num):
        slot = int(slots[i])
        if not bool(active[i]):
            continue
        params = jax.tree.map(lambda leaf: leaf[slot], queue.params)
        opt_state = jax.tree.map(lambda leaf: leaf[slot], queue.opt_state)
        hits = 0.0
        for step_key in jax.random.split(trainee_keys[i], config.model_train_steps):
            images, labels = real_lib.sample_all_classes(real, step_key, config.trained_bs)

            def ce(p):
                logits = apply(p, images)[1]
                return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits,
                                                                                labels)), logits

            (_, logits), grads = jax.value_and_grad(ce, has_aux=True)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            hits += float(np.sum(np.argmax(np.asarray(logits), -1) == np.asarray(labels)))
        queue = queue.replace(
            params=jax.tree.map(lambda s, p: s.at[slot].set(p), queue.params, params),
            opt_state=jax.tree.map(lambda s, p: s.at[slot].set(p), queue.opt_state, opt_state),
            correct=queue.correct.at[slot].add(hits),
            seen=queue.seen.at[slot].add(config.model_train_steps * config.trained_bs))
    return queue


def setup(config, seed):
    """The real data, the engine, a plain-convolution model of the same architecture, a state."""
    images, labels = uneven_data()
    real = real_lib.prepare_real(images, labels, MEAN, STD)
    engine = engine_lib.make_engine(config, real.num_classes, real.image_shape)
    plain_model = models.get_model(config.model, real.num_classes,
                                   conv_op=jax.lax.conv_general_dilated)
    return real, engine, plain_model, engine_lib.init_state(engine, real, seed)


def test_jitted_iterations_equal_the_plain_reference_loop():
    config = config_lib.Config(
        dataset="cifar10", ipc=2, model="ConvNetW32", iterations=3, batch_real=8,
        trained_bs=8, model_train_steps=2, net_num=4, initial_models=2, net_generate_interval=2,
        eval_interval=2, fetch_net_num=2, ce_weight=0.01, lr_img=0.5, eval_every=0)
    real, engine, plain_model, state = setup(config, 3)
    step = engine_lib.make_step(engine, real)
    ref_state = jax.tree.map(jnp.array, state)              # the step donates its input
    scales = []
    for _ in range(config.iterations):                       # pushes at 0 and 2, reset at 2
        ref_state, used = reference_iteration(config, plain_model, engine.optimizer, real,
                                              ref_state)
        state, metrics = step(state, real)
        scales += used
        np.testing.assert_allclose(float(metrics["ce_scale"]), used[-1], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state.images, ref_state.images, rtol=1e-4, atol=2e-4)
        np.testing.assert_allclose(state.image_opt_state, ref_state.image_opt_state, rtol=1e-4,
                                   atol=2e-4)
        for got, want in zip(jax.tree.leaves(state.extractors.params),
                             jax.tree.leaves(ref_state.extractors.params)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-4)
        np.testing.assert_array_equal(state.extractors.seen, ref_state.extractors.seen)
        np.testing.assert_array_equal(state.extractors.correct, ref_state.extractors.correct)
        np.testing.assert_array_equal(state.key, ref_state.key)
        assert int(state.iteration) == int(ref_state.iteration)
    # The run covered an extractor with a non-empty meter, so the CE scale was exercised.
    assert max(scales) > 0 and min(scales) == 0, scales
    assert int(state.extractors.pushed) == 4                      # 2 initial + pushes at 0 and 2


def test_the_reference_notices_a_miswired_step():
    # The same comparison fails when the engine draws the DSA keys of the synthetic images
    # from another stream than the real ones: the reference is able to fail.
    config = config_lib.Config(
        dataset="cifar10", ipc=2, model="ConvNetW32", iterations=1, batch_real=8,
        trained_bs=8, model_train_steps=1, net_num=3, initial_models=2, eval_every=0)
    real, engine, plain_model, state = setup(config, 0)
    ref_state, _ = reference_iteration(config, plain_model, engine.optimizer, real,
                                       jax.tree.map(jnp.array, state))

    from idm_jax import matching
    original = matching.synthetic_outputs

    def shifted_keys(engine, params, syn, dsa_keys, layout, aux_params=None):
        return original(engine, params, syn, jax.vmap(lambda k: jax.random.fold_in(k, 1))(
            dsa_keys), layout, aux_params)

    matching.synthetic_outputs = shifted_keys
    try:
        miswired, _ = jax.jit(engine_lib.make_step(engine, real, jit=False))(state, real)
    finally:
        matching.synthetic_outputs = original
    assert np.abs(np.asarray(miswired.images) - np.asarray(ref_state.images)).max() > 1e-3
