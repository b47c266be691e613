"""Extractor schedules: where a method's feature extractors come from (``base.ExtractorSchedule``).

- ``queue_schedule``: IDM's queue of semi-trained models (docs/FAITHFULNESS.md, "model queue").
  Each iteration starts by resetting the accuracy meters every ``eval_interval`` iterations and
  pushing ``net_push_num`` fresh models every ``net_generate_interval``; each matching pass draws
  one model at random; the iteration ends by training ``fetch_net_num`` models for
  ``model_train_steps`` SGD steps on real batches of the whole train set.
- ``fresh_schedule``: one randomly initialised network, replaced by a new one every ``every``
  iterations and never trained: DM (every iteration) and M3D (every 5).
- ``pool_schedule``: a fixed pool of given networks (pretrained, say), one drawn per matching
  pass, optionally interpolated between its starting and its trained weights.
- ``interpolated_pool_schedule``: NCFM's: one pool network and one interpolation drawn per
  iteration, its trained weights for the calibration pass.
- ``with_auxiliary_pool``: any schedule plus a frozen network drawn per iteration from a pool,
  for an objective that scores the synthetic views under it too (IID).

The schedule's state is a pytree in ``CondenseState.extractors``.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from idm_jax import queue as queue_lib
from idm_jax import real as real_lib
from idm_jax.accel import sharding
from idm_jax.base import ExtractorSchedule, Networks


def queue_schedule(config, nets: Networks) -> ExtractorSchedule:
    """IDM's model queue with the config's capacity, intervals and training settings."""

    def init(key):
        return queue_lib.init_queue(key, nets.init_params, nets.optimizer, config.net_num,
                                    config.initial_models)

    def refresh(queue, iteration, key):
        queue = jax.lax.cond((iteration > 0) & (iteration % config.eval_interval == 0),
                             queue_lib.reset_meters, lambda q: q, queue)

        def push_models(q):
            for push_key in jax.random.split(key, config.net_push_num):
                q = queue_lib.push(q, push_key, nets.init_params, nets.optimizer)
            return q

        if config.net_push_num > 0:
            queue = jax.lax.cond(iteration % config.net_generate_interval == 0, push_models,
                                 lambda q: q, queue)
        return queue

    def draw(queue, key):
        slot = queue_lib.sample_slots(queue, key, 1)[0][0]
        params = jax.tree.map(lambda leaf: leaf[slot], queue.params)
        return params, queue_lib.accuracy_percent(queue, slot)

    def train(queue, real, layout, select_key, batch_key):
        queue, accuracy = train_queue(config, nets, queue, real, layout, select_key, batch_key)
        return queue, {"trainee_acc": jnp.mean(accuracy) if accuracy.size else 0.0,
                       "queue_size": queue_lib.size(queue)}

    return ExtractorSchedule(init=init, refresh=refresh, draw=draw, train=train)


def train_queue(config, nets: Networks, queue: queue_lib.ModelQueue, real, layout,
                select_key: jax.Array, batch_key: jax.Array):
    """Train ``fetch_net_num`` queue models on batches of the whole train set, data-parallel
    over a mesh. Returns (queue, trainee accuracy % (fetch_net_num,))."""
    mesh = layout.mesh

    def logits_fn(params, images):
        return nets.apply(params, images)[1]

    if mesh is not None and config.trained_bs % sharding.mesh_size(mesh) == 0:
        # Explicit data parallelism: each device runs its slice of the batch, and the transpose
        # of the replicated weights sums their gradients. (Left to itself, the compiler
        # all-gathers the batch of the vmapped trainees.)
        logits_fn = sharding.data_parallel(logits_fn, mesh)

    def trainee_batch(k):
        images, labels = real_lib.sample_all_classes(real, k, config.trained_bs,
                                                     config.normalize_train)
        return layout.constrain(images), layout.constrain(labels)

    slots, active = queue_lib.sample_slots(queue, select_key, config.fetch_net_num)
    return queue_lib.train_slots(
        queue, batch_key, slots, active, logits_fn, trainee_batch, nets.optimizer,
        config.model_train_steps, map_trainees=nets.map_models,
        chunk=nets.chunk if mesh is None else 0)


def fresh_schedule(nets: Networks, every: int) -> ExtractorSchedule:
    """A fresh random network every ``every`` iterations (iteration 0 included), never trained.

    The state is the current network's params; its accuracy is 0, so a CE term weighted by it
    is off. Each new network is ``init_params(split(key, 1)[0])`` with the iteration's refresh
    key, the same draw as a one-slot queue pushed at that iteration.
    """
    if every < 1:
        raise ValueError(f"a fresh extractor every {every} iterations: give 1 or more")

    def refresh(params, iteration, key):
        def fresh(_):
            return nets.init_params(jax.random.split(key, 1)[0])
        return jax.lax.cond(iteration % every == 0, fresh, lambda p: p, params)

    def draw(params, key):
        del key
        return params, jnp.float32(0.0)

    def train(params, real, layout, select_key, batch_key):
        del real, layout, select_key, batch_key
        return params, {"trainee_acc": jnp.float32(0.0), "queue_size": jnp.int32(1)}

    return ExtractorSchedule(init=nets.init_params, refresh=refresh, draw=draw, train=train)


def pool_schedule(pool, start=None, mix: tuple[float, float] = (0.0, 1.0),
                  accuracy=None) -> ExtractorSchedule:
    """A fixed pool of P networks; each matching pass draws one uniformly, never trained.

    Args:
      pool: params of the P networks stacked on a leading axis (leaves (P, ...)).
      start: the same networks' starting params, stacked alike; with them a draw is
        ``start + a * (pool - start)`` with ``a ~ U(mix)`` (weights interpolated between the
        init and the trained network); None draws the pool's params as they are.
      accuracy: (P,) each network's accuracy in percent, for a CE term weighted by it; None: 0.

    The state is the pool itself (and ``start``), so it is checkpointed with the run.
    """
    size = jax.tree.leaves(pool)[0].shape[0]
    state = {"pool": pool, "start": start,
             "accuracy": (jnp.zeros(size, jnp.float32) if accuracy is None
                          else jnp.asarray(accuracy, jnp.float32))}
    low, high = mix

    def draw(state, key):
        k_pick, k_mix = jax.random.split(key)
        index = jax.random.randint(k_pick, (), 0, size)
        params = jax.tree.map(lambda leaf: leaf[index], state["pool"])
        if state["start"] is not None:
            a = jax.random.uniform(k_mix, (), jnp.float32, low, high)
            params = jax.tree.map(lambda p, s: s[index] + a * (p - s[index]), params,
                                  state["start"])
        return params, state["accuracy"][index]

    def train(state, real, layout, select_key, batch_key):
        del real, layout, select_key, batch_key
        return state, {"trainee_acc": jnp.float32(0.0), "queue_size": jnp.int32(size)}

    def init(key):
        del key     # copies: the step donates its state, and a second run reuses this one
        return jax.tree.map(jnp.array, state)

    return ExtractorSchedule(init=init, refresh=lambda st, it, key: st, draw=draw, train=train)


def interpolated_pool_schedule(start, trained) -> ExtractorSchedule:
    """NCFM's extractors: once per iteration, one network of a pretrained pool drawn uniformly
    and an l ~ U(0, 1); every pass of that iteration matches with ``l * start + (1 - l) *
    trained`` of that network, and the calibration pass uses its trained weights.

    Args:
      start, trained: the pool's initial and trained params, stacked (leaves (P, ...)).

    The state holds the pool, the drawn index and l, so it is checkpointed with the run.
    """
    size = jax.tree.leaves(trained)[0].shape[0]

    def init(key):        # copies: the step donates its state, and a second run reuses the pool
        return {"start": jax.tree.map(jnp.array, start),
                "trained": jax.tree.map(jnp.array, trained),
                "index": jnp.int32(0), "mix": jnp.float32(0.0)}

    def refresh(state, iteration, key):
        del iteration
        k_pick, k_mix = jax.random.split(key)
        return dict(state, index=jax.random.randint(k_pick, (), 0, size),
                    mix=jax.random.uniform(k_mix, (), jnp.float32))

    def pick(tree, index):
        return jax.tree.map(lambda leaf: leaf[index], tree)

    def draw(state, key):
        del key
        l, i = state["mix"], state["index"]
        params = jax.tree.map(lambda s, t: l * s + (1.0 - l) * t, pick(state["start"], i),
                              pick(state["trained"], i))
        return params, jnp.float32(0.0)

    def train(state, real, layout, select_key, batch_key):
        del real, layout, select_key, batch_key
        return state, {"trainee_acc": jnp.float32(0.0), "queue_size": jnp.int32(size)}

    return ExtractorSchedule(init=init, refresh=refresh, draw=draw, train=train,
                             calibration=lambda state: pick(state["trained"], state["index"]))


def with_auxiliary_pool(schedule: ExtractorSchedule, pool) -> ExtractorSchedule:
    """``schedule`` plus an auxiliary network drawn uniformly from a fixed ``pool`` (params
    stacked on a leading axis) once per iteration, for the objective (IID's pretrained
    ResNet-18s, frozen). The base schedule's state, draws and training are unchanged."""
    size = jax.tree.leaves(pool)[0].shape[0]

    def init(key):
        return {"base": schedule.init(key), "pool": jax.tree.map(jnp.array, pool),
                "index": jnp.int32(0)}

    def refresh(state, iteration, key):
        # The base schedule keeps the key it would have had alone; the pick folds it.
        index = jax.random.randint(jax.random.fold_in(key, 7), (), 0, size)
        return dict(state, base=schedule.refresh(state["base"], iteration, key), index=index)

    def draw(state, key):
        return schedule.draw(state["base"], key)

    def train(state, real, layout, select_key, batch_key):
        base, metrics = schedule.train(state["base"], real, layout, select_key, batch_key)
        return dict(state, base=base), metrics

    calibration = (None if schedule.calibration is None
                   else lambda state: schedule.calibration(state["base"]))
    return ExtractorSchedule(
        init=init, refresh=refresh, draw=draw, train=train, calibration=calibration,
        auxiliary=lambda state: jax.tree.map(lambda leaf: leaf[state["index"]], state["pool"]))


__all__ = ["queue_schedule", "train_queue", "fresh_schedule", "pool_schedule",
           "interpolated_pool_schedule", "with_auxiliary_pool"]
