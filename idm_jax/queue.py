"""IDM's model queue: a FIFO of semi-trained feature extractors as one stacked pytree.

The official code keeps a Python list of networks, optimisers and accuracy meters
(docs/FAITHFULNESS.md, "model queue"). Here the queue is a fixed-capacity ring buffer: every leaf of
the parameters and of the optimiser states has a leading axis of size ``capacity``; a validity mask
says which slots hold a model, ``birth`` numbers the models in push order, and per-slot meters count
correct predictions and seen examples since the last reset. Shapes never change, so every operation
compiles once.

Slots are filled in ring order, so the slot a push writes to is always the oldest model once the
queue is full: that is the FIFO pop.
"""

from __future__ import annotations

from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from idm_jax import classifier

PyTree = object
InitFn = Callable[[jax.Array], PyTree]        # key -> params of a fresh model
LogitsFn = Callable[[PyTree, jax.Array], jax.Array]  # (params, images) -> logits
BatchFn = Callable[[jax.Array], tuple]        # key -> (images, labels)


@flax.struct.dataclass
class ModelQueue:
    """Stacked queue state. ``capacity`` = leading axis of every leaf."""

    params: PyTree          # leaves (capacity, ...)
    opt_state: PyTree       # leaves (capacity, ...)
    valid: jax.Array        # (capacity,) bool
    birth: jax.Array        # (capacity,) int32, push order of the model in the slot (-1: empty)
    correct: jax.Array      # (capacity,) float32, correct training predictions since reset
    seen: jax.Array         # (capacity,) float32, training examples since reset
    next_slot: jax.Array    # () int32, ring position of the next push
    pushed: jax.Array       # () int32, models pushed so far (births are 0..pushed-1)

    @property
    def capacity(self) -> int:
        return self.valid.shape[0]


def _fresh_model(key, init_fn: InitFn, optimizer: optax.GradientTransformation):
    params = init_fn(key)
    return params, optimizer.init(params)


def init_queue(key: jax.Array, init_fn: InitFn, optimizer: optax.GradientTransformation,
               capacity: int, initial_models: int) -> ModelQueue:
    """A queue of ``capacity`` slots, the first ``initial_models`` holding fresh models."""
    if not 1 <= initial_models <= capacity:
        raise ValueError(f"initial_models must be in 1..capacity ({capacity}), "
                         f"got {initial_models}")
    keys = jax.random.split(key, capacity)
    params, opt_state = jax.vmap(lambda k: _fresh_model(k, init_fn, optimizer))(keys)
    slots = jnp.arange(capacity)
    return ModelQueue(
        params=params, opt_state=opt_state, valid=slots < initial_models,
        birth=jnp.where(slots < initial_models, slots, -1).astype(jnp.int32),
        correct=jnp.zeros(capacity, jnp.float32), seen=jnp.zeros(capacity, jnp.float32),
        next_slot=jnp.asarray(initial_models % capacity, jnp.int32),
        pushed=jnp.asarray(initial_models, jnp.int32))


def _set_slot(tree, slot, value):
    return jax.tree.map(lambda stacked, new: stacked.at[slot].set(new), tree, value)


def push(queue: ModelQueue, key: jax.Array, init_fn: InitFn,
         optimizer: optax.GradientTransformation) -> ModelQueue:
    """Add one fresh model; when the queue is full it replaces the oldest (FIFO)."""
    params, opt_state = _fresh_model(key, init_fn, optimizer)
    slot = queue.next_slot
    return queue.replace(
        params=_set_slot(queue.params, slot, params),
        opt_state=_set_slot(queue.opt_state, slot, opt_state),
        valid=queue.valid.at[slot].set(True),
        birth=queue.birth.at[slot].set(queue.pushed),
        correct=queue.correct.at[slot].set(0.0), seen=queue.seen.at[slot].set(0.0),
        next_slot=(slot + 1) % queue.capacity, pushed=queue.pushed + 1)


def reset_meters(queue: ModelQueue) -> ModelQueue:
    """Zero every model's accuracy meter (the official code does it at each eval iteration)."""
    return queue.replace(correct=jnp.zeros_like(queue.correct), seen=jnp.zeros_like(queue.seen))


def size(queue: ModelQueue) -> jax.Array:
    return jnp.sum(queue.valid.astype(jnp.int32))


def accuracy_percent(queue: ModelQueue, slot: jax.Array) -> jax.Array:
    """Running training accuracy of the model in ``slot``, in percent; 0 if its meter is empty."""
    seen = queue.seen[slot]
    return jnp.where(seen > 0, 100.0 * queue.correct[slot] / jnp.maximum(seen, 1.0), 0.0)


def sample_slots(queue: ModelQueue, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """``n`` distinct slots drawn uniformly among the valid ones.

    Returns (slots (n,) int32, active (n,) bool); ``active`` is False for the draws beyond the
    number of valid models (the official code takes ``min(n, len(queue))``).
    """
    scores = jax.random.uniform(key, (queue.capacity,))
    scores = jnp.where(queue.valid, scores, -1.0)
    top, slots = jax.lax.top_k(scores, n)
    return slots.astype(jnp.int32), top >= 0.0


def gather(tree: PyTree, slots: jax.Array) -> PyTree:
    """The stacked entries of ``slots``: leaves (capacity, ...) -> (len(slots), ...)."""
    return jax.tree.map(lambda leaf: leaf[slots], tree)


def train_slots(queue: ModelQueue, key: jax.Array, slots: jax.Array, active: jax.Array,
                logits_fn: LogitsFn, sample_batch: BatchFn,
                optimizer: optax.GradientTransformation, steps: int,
                map_trainees: Callable = jax.vmap,
                chunk: int = 0) -> tuple[ModelQueue, jax.Array]:
    """Train the models in ``slots`` for ``steps`` SGD steps each on real batches.

    Each step draws a fresh batch with ``sample_batch(key)`` (its own key per trainee and step),
    minimises mean cross-entropy, applies ``optimizer`` with the model's persistent state, and adds
    the batch's correct predictions to the model's meter. ``map_trainees`` runs the trainees:
    ``jax.vmap`` (one batched program) or ``backend.sequential`` (one after another; the engine
    passes its backend policy's ``map_models``, sequential on CPU). Values are the same.

    Each step is ``classifier.train_step``: ``chunk`` > 0 sums the gradient over chunks of that
    many images (same values, faster on CPU); 0 uses the whole batch. Returns the updated queue
    and the trainees' accuracy over these steps, in percent, (n,).
    """
    if steps == 0 or slots.shape[0] == 0:
        return queue, jnp.zeros(slots.shape, jnp.float32)

    def train_one(params, opt_state, trainee_key):
        def step(carry, step_key):
            params, opt_state = carry
            images, labels = sample_batch(step_key)

            def loss_fn(p, batch):
                # Mean over the whole batch, written as a sum of rows / batch size so that
                # chunks of the batch add up to it.
                chunk_images, chunk_labels = batch
                logits = logits_fn(p, chunk_images)
                ce = optax.softmax_cross_entropy_with_integer_labels(logits, chunk_labels)
                return jnp.sum(ce) / labels.shape[0], logits

            params, opt_state, logits = classifier.train_step(
                loss_fn, params, opt_state, (images, labels), optimizer, chunk=chunk)
            correct = jnp.sum((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
            return (params, opt_state), correct

        (params, opt_state), correct = jax.lax.scan(
            step, (params, opt_state), jax.random.split(trainee_key, steps))
        return params, opt_state, jnp.sum(correct)

    keys = jax.random.split(key, slots.shape[0])
    args = (gather(queue.params, slots), gather(queue.opt_state, slots), keys)
    params, opt_state, correct = map_trainees(train_one)(*args)

    batch = jax.eval_shape(sample_batch, key)[1].shape[0]
    seen = jnp.float32(steps * batch)

    def scatter(stacked, new):
        # Inactive draws (fewer valid models than trainees) leave their slot untouched.
        keep = active.reshape((-1,) + (1,) * (new.ndim - 1))
        return stacked.at[slots].set(jnp.where(keep, new, stacked[slots]))

    queue = queue.replace(
        params=jax.tree.map(scatter, queue.params, params),
        opt_state=jax.tree.map(scatter, queue.opt_state, opt_state),
        correct=queue.correct.at[slots].add(jnp.where(active, correct, 0.0)),
        seen=queue.seen.at[slots].add(jnp.where(active, seen, 0.0)))
    return queue, 100.0 * correct / seen


__all__ = ["ModelQueue", "init_queue", "push", "reset_meters", "size",
           "accuracy_percent", "sample_slots", "gather", "train_slots"]
