"""Model queue invariants against a plain Python FIFO model of the official list-based queue."""

import collections

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from idm_jax import classifier
from idm_jax.accel import backend
from idm_jax import queue as queue_lib


def tiny_init(key):
    """A linear classifier on 4 features, 3 classes: enough to exercise the queue."""
    k1, k2 = jax.random.split(key)
    return {"w": jax.random.normal(k1, (4, 3)) * 0.1, "b": jax.random.normal(k2, (3,)) * 0.1}


def tiny_logits(params, x):
    return x @ params["w"] + params["b"]


OPT = classifier.sgd(0.1, 0.9, 5e-4)


def test_fifo_order_capacity_and_mask_under_many_pushes():
    capacity, initial = 5, 3
    q = queue_lib.init_queue(jax.random.PRNGKey(0), tiny_init, OPT, capacity, initial)
    reference = collections.deque(range(initial))       # births, oldest first
    push = jax.jit(lambda q, k: queue_lib.push(q, k, tiny_init, OPT))
    next_birth = initial
    for i in range(13):
        if len(reference) == capacity:
            reference.popleft()
        reference.append(next_birth)
        next_birth += 1
        q = push(q, jax.random.PRNGKey(100 + i))
        valid = np.asarray(q.valid)
        births = sorted(np.asarray(q.birth)[valid].tolist())
        assert births == list(reference), (i, births, list(reference))
        assert valid.sum() == min(capacity, initial + i + 1)
        assert int(queue_lib.size(q)) == len(reference)
        # invalid slots carry no birth
        assert (np.asarray(q.birth)[~valid] == -1).all()


def test_push_overwrites_the_oldest_slot_with_fresh_params_and_empty_meter():
    q = queue_lib.init_queue(jax.random.PRNGKey(0), tiny_init, OPT, 3, 3)
    q = q.replace(correct=jnp.array([5.0, 6.0, 7.0]), seen=jnp.array([10.0, 10.0, 10.0]))
    oldest = int(np.argmin(np.where(np.asarray(q.valid), np.asarray(q.birth), 1 << 30)))
    key = jax.random.PRNGKey(7)
    q2 = queue_lib.push(q, key, tiny_init, OPT)
    fresh = tiny_init(key)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[oldest], q2.params), fresh)
    assert float(q2.seen[oldest]) == 0.0 and float(q2.correct[oldest]) == 0.0
    others = [s for s in range(3) if s != oldest]
    np.testing.assert_array_equal(np.asarray(q2.seen)[others], 10.0)


def test_reset_meters_zeroes_everything():
    q = queue_lib.init_queue(jax.random.PRNGKey(0), tiny_init, OPT, 4, 2)
    q = q.replace(correct=jnp.ones(4), seen=jnp.full(4, 3.0))
    q = queue_lib.reset_meters(q)
    np.testing.assert_array_equal(np.asarray(q.correct), 0.0)
    np.testing.assert_array_equal(np.asarray(q.seen), 0.0)
    assert float(queue_lib.accuracy_percent(q, 0)) == 0.0   # empty meter -> 0, not NaN


def test_sample_slots_distinct_valid_and_uniform():
    q = queue_lib.init_queue(jax.random.PRNGKey(0), tiny_init, OPT, 8, 5)
    sample = jax.jit(lambda k: queue_lib.sample_slots(q, k, 2))
    counts = np.zeros(8)
    for i in range(600):
        slots, active = sample(jax.random.PRNGKey(i))
        slots = np.asarray(slots)
        assert len(set(slots.tolist())) == 2
        assert np.asarray(active).all()
        assert (slots < 5).all()                # only valid slots
        counts[slots] += 1
    # 1200 draws over 5 slots: 240 each; a 4-sigma band.
    np.testing.assert_allclose(counts[:5], 240, atol=4 * np.sqrt(240))
    # More draws than valid models: the extra draws are inactive.
    small = queue_lib.init_queue(jax.random.PRNGKey(0), tiny_init, OPT, 4, 1)
    slots, active = queue_lib.sample_slots(small, jax.random.PRNGKey(0), 2)
    assert np.asarray(active).tolist() == [True, False] and int(slots[0]) == 0


def test_training_updates_only_trainees_and_meters_match_numpy_count():
    rng = np.random.default_rng(0)
    data_x = jnp.asarray(rng.normal(size=(64, 4)), jnp.float32)
    data_y = jnp.asarray(rng.integers(0, 3, size=64), jnp.int32)

    def sample_batch(key):
        idx = jax.random.choice(key, 64, (16,), replace=False)
        return data_x[idx], data_y[idx]

    q = queue_lib.init_queue(jax.random.PRNGKey(0), tiny_init, OPT, 6, 4)
    slots = jnp.array([3, 1])
    active = jnp.array([True, True])
    key = jax.random.PRNGKey(5)
    steps = 3
    q2, acc = jax.jit(lambda q: queue_lib.train_slots(q, key, slots, active, tiny_logits,
                                                      sample_batch, OPT, steps))(q)

    # Independent loop: train each trainee with plain optax, count correct predictions in NumPy.
    keys = jax.random.split(key, 2)
    for j, slot in enumerate([3, 1]):
        params = jax.tree.map(lambda x: x[slot], q.params)
        opt_state = OPT.init(params)
        correct = 0
        for step_key in jax.random.split(keys[j], steps):
            x, y = sample_batch(step_key)
            logits = np.asarray(tiny_logits(params, x))
            correct += int((logits.argmax(-1) == np.asarray(y)).sum())
            grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
                tiny_logits(p, x), y).mean())(params)
            updates, opt_state = OPT.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        chex.assert_trees_all_close(jax.tree.map(lambda x: x[slot], q2.params), params,
                                    atol=1e-5)
        assert float(q2.correct[slot]) == correct
        assert float(q2.seen[slot]) == steps * 16
        np.testing.assert_allclose(float(acc[j]), 100.0 * correct / (steps * 16), rtol=1e-6)
        np.testing.assert_allclose(float(queue_lib.accuracy_percent(q2, slot)),
                                   100.0 * correct / (steps * 16), rtol=1e-6)
    for slot in (0, 2, 4, 5):   # untouched
        chex.assert_trees_all_equal(jax.tree.map(lambda x: x[slot], q2.params),
                                    jax.tree.map(lambda x: x[slot], q.params))
        assert float(q2.seen[slot]) == 0.0

    # Sequential (lax.map) trainees give the same result as vmapped ones.
    q3, _ = queue_lib.train_slots(q, key, slots, active, tiny_logits, sample_batch, OPT, steps,
                                  map_trainees=backend.sequential)
    chex.assert_trees_all_close(q3.params, q2.params, atol=1e-6)
    # Gradients accumulated over chunks of 4 of the 16 images give the same training.
    q4, acc4 = queue_lib.train_slots(q, key, slots, active, tiny_logits, sample_batch, OPT,
                                     steps, chunk=4)
    chex.assert_trees_all_close(q4.params, q2.params, atol=1e-6)
    np.testing.assert_array_equal(q4.correct, q2.correct)
    np.testing.assert_allclose(acc4, acc, rtol=1e-6)


def test_inactive_trainee_is_left_untouched():
    data = (jnp.ones((8, 4)), jnp.zeros(8, jnp.int32))
    q = queue_lib.init_queue(jax.random.PRNGKey(0), tiny_init, OPT, 4, 1)
    slots, active = queue_lib.sample_slots(q, jax.random.PRNGKey(1), 2)
    q2, _ = queue_lib.train_slots(q, jax.random.PRNGKey(2), slots, active, tiny_logits,
                                  lambda k: data, OPT, 2)
    inactive = int(slots[1])
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x[inactive], q2.params),
                                jax.tree.map(lambda x: x[inactive], q.params))
    assert float(q2.seen[inactive]) == 0.0 and float(q2.seen[int(slots[0])]) == 16.0
