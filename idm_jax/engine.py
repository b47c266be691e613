"""The IDM condensation engine: explicit state and one jitted outer iteration.

One call of the step is one outer iteration of the official ``IDM_cifar10.py`` loop
(docs/FAITHFULNESS.md, "outer iteration"), in this order:

1. ``refresh_queue``: reset the accuracy meters every ``eval_interval`` iterations and push a
   fresh model every ``net_generate_interval``;
2. ``matching.match``, ``train_net_num`` times: one extractor, every class, one image update;
3. ``train_queue``: train ``fetch_net_num`` queue models on real batches.

Classes are a vmapped axis, the queue is a stacked pytree, and nothing leaves the device. The
same step runs on one device or, given a ``jax.sharding`` mesh, with the class axis split over
several devices (``sharding.ClassLayout``) and the queue trainees data-parallel. The run loop
with checkpoints and outputs is ``idm_jax.run``; ``condense`` here is the minimal library call.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from idm_jax import backend, matching, memory, models, partition
from idm_jax import queue as queue_lib
from idm_jax import real as real_lib
from idm_jax import sharding, validate
from idm_jax.config import Config
from idm_jax.real import RealData, prepare_real


# --------------------------------------------------------------------------- state
@flax.struct.dataclass
class CondenseState:
    """Everything a run needs to continue; a checkpoint stores exactly this."""

    images: jax.Array        # (K*ipc, H, W, C) float32 synthetic images (normalised space)
    momentum: jax.Array      # same shape, the image optimiser's buffer
    queue: queue_lib.ModelQueue
    key: jax.Array           # (2,) uint32 raw PRNG key
    iteration: jax.Array     # () int32, next outer iteration to run

    @staticmethod
    def layout(mesh: Mesh, num_rows: int) -> "CondenseState":
        """Sharding prefix on ``mesh`` with ``num_rows`` (= K*ipc) synthetic rows: the rows split
        (replicated when the mesh does not divide them), the queue, key and counter replicated."""
        rep = sharding.replicated(mesh)
        row = sharding.rows(mesh, num_rows)
        return CondenseState(images=row, momentum=row, queue=rep, key=rep, iteration=rep)


def shard_state(state: CondenseState, mesh: Mesh) -> CondenseState:
    """A state (fresh, or restored from any checkpoint) placed on ``mesh``."""
    return sharding.place(state, CondenseState.layout(mesh, state.images.shape[0]))


def synthetic_labels(num_classes: int, ipc: int) -> jnp.ndarray:
    """Fixed hard labels of the stored set: [0]*ipc + [1]*ipc + ..."""
    return jnp.repeat(jnp.arange(num_classes, dtype=jnp.int32), ipc)


class Engine(NamedTuple):
    """The model, functions and policy a run is built from (static: not part of the state)."""

    config: Config
    model: Any
    optimizer: Any
    init_params: Callable             # key -> params of a fresh model
    apply: Callable                   # (params, images) -> (embedding, logits), float32
    policy: backend.Policy            # device-dependent choices, resolved once
    objective: matching.Objective     # one class's loss; replace it to try another objective


def make_engine(config: Config, num_classes: int, image_shape, *,
                policy: Optional[backend.Policy] = None,
                objective: Optional[matching.Objective] = None,
                max_per_class: Optional[int] = None) -> Engine:
    """Build the engine for ``num_classes`` classes of ``image_shape`` (H, W, C) images.

    ``policy`` defaults to ``backend.resolve(config.microbatch)``; ``objective`` to the config's
    (``matching.make_objective``). With ``max_per_class`` (the largest class's image count) and
    the automatic ``microbatch``, an accelerator run chunks its network calls to fit the device's
    memory (``idm_jax.memory``) instead of always using whole batches, and a CPU run whose kept
    activations would not fit the host's memory recomputes them (``memory.cpu_needs_remat``).
    """
    validate.check_config(config, image_shape)    # architectures and partition geometry
    channels = image_shape[2]
    automatic = policy is None and config.microbatch == -1
    policy = backend.resolve(config.microbatch) if policy is None else policy
    dtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32
    model = models.get_model(config.model, num_classes, in_channels=channels, dtype=dtype,
                             cpu_kernels=policy.cpu_kernels)
    dummy = jnp.zeros((1,) + tuple(image_shape), jnp.float32)

    def init_params(key):
        return model.init(key, dummy)["params"]

    def apply(params, images):
        embedding, logits = model.apply({"params": params}, images)
        return embedding.astype(jnp.float32), logits.astype(jnp.float32)

    if automatic and max_per_class:
        params = jax.eval_shape(init_params, jax.random.PRNGKey(0))
        if policy.platform == "cpu":    # cache-sized chunks; remat only when memory is short
            remat = memory.cpu_needs_remat(config, num_classes, image_shape, max_per_class,
                                           apply, params, memory.host_memory_bytes())
            policy = dataclasses.replace(policy, remat=remat)
        else:             # whole batches where they fit, else chunks sized to the memory
            budget = memory.plan(config, num_classes, image_shape, max_per_class, apply,
                                 params, memory.device_memory_bytes())
            policy = dataclasses.replace(policy, chunk=budget.chunk, remat=budget.chunk > 0)
    optimizer = queue_lib.net_optimizer(config.lr_net, config.net_momentum,
                                        config.net_weight_decay)
    objective = matching.make_objective(config) if objective is None else objective
    return Engine(config, model, optimizer, init_params, apply, policy, objective)


def init_synthetic(key: jax.Array, config: Config, real: RealData) -> jax.Array:
    """The initial synthetic set (FAITHFULNESS.md, "init"): (K*ipc, H, W, C) float32, normalised."""
    counts = np.asarray(real.counts)
    num_classes, nmax = real.num_classes, real.max_per_class
    ipc, shape = config.ipc, real.image_shape
    if config.init == "noise":
        return jax.random.normal(key, (num_classes * ipc,) + shape, jnp.float32)
    if counts.min() < ipc:
        raise ValueError(f"class {int(counts.argmin())} has only {int(counts.min())} real images "
                         f"but ipc={ipc}; lower ipc or use init='noise'")
    draws = {"mosaic": 4, "mosaic_repeat": 1, "real": 1}[config.init]
    draws = config.partition_factor ** 2 if config.init == "mosaic" else draws
    sampling = "first" if config.real_sampling == "first" else "random"
    picks = []
    for draw_key in jax.random.split(key, draws):
        idx, _ = real_lib.class_batch_indices(draw_key, real.counts, nmax, ipc, sampling)
        picks.append(jnp.take_along_axis(
            real.class_images, idx.reshape(idx.shape + (1, 1, 1)), axis=1))  # (K, ipc, H, W, C)
    pixels = jnp.stack(picks)                                # (draws, K, ipc, H, W, C)
    x = real_lib.to_float(real, pixels, config.normalize_train)
    if config.init == "real":
        return x[0].reshape((-1,) + shape)
    if config.init == "mosaic_repeat":
        x = jnp.repeat(x, config.partition_factor ** 2, axis=0)
    x = x.reshape((x.shape[0], num_classes * ipc) + shape)
    return partition.mosaic(x, config.partition_factor)


def init_state(engine: Engine, real: RealData, seed_or_key) -> CondenseState:
    """Fresh state: synthetic init, zero momentum, a queue of ``initial_models`` random models."""
    config = engine.config
    key = (jax.random.PRNGKey(seed_or_key) if isinstance(seed_or_key, int)
           else jnp.asarray(seed_or_key))
    key, k_images, k_queue = jax.random.split(key, 3)
    images = init_synthetic(k_images, config, real)
    queue = queue_lib.init_queue(k_queue, engine.init_params, engine.optimizer,
                                 config.net_num, config.initial_models)
    return CondenseState(images=images, momentum=jnp.zeros_like(images), queue=queue,
                         key=key, iteration=jnp.asarray(0, jnp.int32))


# --------------------------------------------------------------------------- queue upkeep
def refresh_queue(engine: Engine, queue: queue_lib.ModelQueue, iteration: jax.Array,
                  key: jax.Array) -> queue_lib.ModelQueue:
    """Start of an iteration: reset the meters every ``eval_interval`` iterations (not at 0) and
    push ``net_push_num`` fresh models every ``net_generate_interval`` (at 0 too)."""
    config = engine.config
    queue = jax.lax.cond((iteration > 0) & (iteration % config.eval_interval == 0),
                         queue_lib.reset_meters, lambda q: q, queue)

    def push_models(q):
        for push_key in jax.random.split(key, config.net_push_num):
            q = queue_lib.push(q, push_key, engine.init_params, engine.optimizer)
        return q

    if config.net_push_num > 0:
        queue = jax.lax.cond(iteration % config.net_generate_interval == 0, push_models,
                             lambda q: q, queue)
    return queue


def train_queue(engine: Engine, queue: queue_lib.ModelQueue, real: RealData,
                k_trainees: jax.Array, k_train: jax.Array, layout: sharding.ClassLayout):
    """End of an iteration: train ``fetch_net_num`` queue models on batches of the whole train
    set. Returns (queue, trainee accuracy % (fetch_net_num,))."""
    config, mesh = engine.config, layout.mesh

    def logits_fn(params, images):
        return engine.apply(params, images)[1]

    if mesh is not None and config.trained_bs % sharding.mesh_size(mesh) == 0:
        # Explicit data parallelism: each device runs its slice of the batch, and the transpose
        # of the replicated weights sums their gradients. (Left to itself, the compiler
        # all-gathers the batch of the vmapped trainees.)
        logits_fn = sharding.data_parallel(logits_fn, mesh)

    def trainee_batch(k):
        images, labels = real_lib.sample_all_classes(real, k, config.trained_bs,
                                                     config.normalize_train)
        return layout.constrain(images), layout.constrain(labels)

    slots, active = queue_lib.sample_slots(queue, k_trainees, config.fetch_net_num)
    return queue_lib.train_slots(
        queue, k_train, slots, active, logits_fn, trainee_batch, engine.optimizer,
        config.model_train_steps, vmap_trainees=engine.policy.vmap_models,
        chunk=engine.policy.chunk if mesh is None else 0)


# --------------------------------------------------------------------------- one iteration
def make_step(engine: Engine, real: RealData, jit: bool = True,
              mesh: Optional[Mesh] = None) -> Callable:
    """The outer iteration ``step(state, real) -> (state, metrics)``.

    With ``jit`` (default) it is compiled once and donates ``state``; ``jit=False`` returns the
    plain function (to wrap it, e.g. with ``chex.assert_max_traces``). With ``mesh``
    (``sharding.make_mesh``) it expects ``real`` placed by ``real.shard_real`` and ``state`` by
    ``shard_state``, and returns the state in that layout. ``metrics`` are device scalars.
    """
    config = engine.config
    if mesh is not None and real.per_class.shape[0] % sharding.mesh_size(mesh):
        raise ValueError(f"the real data has {real.per_class.shape[0]} classes, which the "
                         f"{sharding.mesh_size(mesh)}-device mesh does not divide; place it "
                         f"with idm_jax.real.shard_real(real, mesh) (it pads the class axis)")
    layout = sharding.ClassLayout(real.num_classes, mesh)

    def step(state: CondenseState, r: RealData):
        # ``r`` is an argument, not a closure constant: the dataset is not baked into the program.
        key, k_push, k_match, k_trainees, k_train = jax.random.split(state.key, 5)
        queue = refresh_queue(engine, state.queue, state.iteration, k_push)
        images, momentum, metrics = state.images, state.momentum, {}
        for match_key in jax.random.split(k_match, config.train_net_num):
            images, momentum, metrics = matching.match(engine, r, images, momentum, queue,
                                                       match_key, layout)
        queue, trainee_acc = train_queue(engine, queue, r, k_trainees, k_train, layout)
        # The loss is taken before the update, so a blow-up shows in the images one iteration
        # before it shows in the loss (or never, on the last iteration): report both.
        metrics = dict(metrics, trainee_acc=jnp.mean(trainee_acc) if trainee_acc.size else 0.0,
                       queue_size=queue_lib.size(queue),
                       images_finite=jnp.all(jnp.isfinite(images)).astype(jnp.float32))
        return CondenseState(images=images, momentum=momentum, queue=queue, key=key,
                             iteration=state.iteration + 1), metrics

    if not jit:
        return step
    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    state_layout = CondenseState.layout(mesh, real.num_classes * config.ipc)
    return jax.jit(step, donate_argnums=0,
                   in_shardings=(state_layout, RealData.layout(mesh)),
                   out_shardings=(state_layout, sharding.replicated(mesh)))


# --------------------------------------------------------------------------- iterating
class CondensedSet(NamedTuple):
    """A condensed set in normalised space, as stored (before partition-and-expand)."""

    images: np.ndarray      # (K*ipc, H, W, C) float32
    labels: np.ndarray      # (K*ipc,) int32
    mean: np.ndarray        # (C,) normalisation mean, [0,1] units
    std: np.ndarray         # (C,)


def condensed_set(state: CondenseState, real: RealData, ipc: int) -> CondensedSet:
    images = sharding.to_host(state.images)
    return CondensedSet(images, np.asarray(synthetic_labels(real.num_classes, ipc)),
                        np.asarray(real.mean), np.asarray(real.std))


def iterate(engine: Engine, real: RealData, state: CondenseState,
            until: Optional[int] = None, step: Optional[Callable] = None,
            mesh: Optional[Mesh] = None) -> Iterator[tuple[int, CondenseState, dict]]:
    """Run iterations from ``state.iteration`` up to ``until`` (default config.iterations).

    Yields ``(iteration, state, metrics)`` after every iteration: ``iteration`` is the host
    count of iterations done, ``metrics`` the step's device scalars. Nothing waits for the
    device: fetch the metrics when you need them (``jax.device_get``), so an accelerator keeps
    running ahead. The yielded state is the only live copy (the step donates its input), so
    keep it if you stop early. Pass ``step`` (from ``make_step``) to reuse one compiled program.
    """
    if mesh is not None:
        real, state = real_lib.shard_real(real, mesh), shard_state(state, mesh)
    step = make_step(engine, real, mesh=mesh) if step is None else step
    until = engine.config.iterations if until is None else until
    done = int(state.iteration)        # the one host read, before the loop
    while done < until:
        state, metrics = step(state, real)
        done += 1
        yield done, state, metrics


class NonFiniteError(FloatingPointError):
    """The loss or the synthetic images stopped being finite."""


def check_finite(metrics: dict, iteration: int) -> None:
    """The one NaN/Inf policy: raise ``NonFiniteError`` if the loss of ``iteration`` (0-based) or
    the images after it are not finite. ``metrics`` are host values."""
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise NonFiniteError(f"the loss became {loss} at iteration {iteration}")
    if float(metrics.get("images_finite", 1.0)) != 1.0:
        raise NonFiniteError(f"the synthetic images became NaN or Inf at iteration {iteration}")


def condense(config: Config, train_images: np.ndarray, train_labels: np.ndarray, *, mean, std,
             num_classes: Optional[int] = None, state: Optional[CondenseState] = None,
             callback: Optional[Callable[[CondenseState, dict], None]] = None,
             mesh: Optional[Mesh] = None) -> tuple[CondensedSet, CondenseState]:
    """Condense a labelled uint8 image set with IDM; the minimal library entry point.

    Args:
      config: run configuration (see ``idm_jax.config``).
      train_images: (N, H, W, C) uint8 real images; train_labels: (N,) ints.
      mean, std: per-channel normalisation constants in [0,1] pixel units.
      state: continue from this state (e.g. restored from a checkpoint) instead of a fresh one.
      callback: called as ``callback(state, metrics)`` after every iteration with host metrics
        (and ``iteration``, 0-based); raise from it to stop. Fetching those metrics waits for
        the device each iteration; leave it None to let an accelerator run ahead.
      mesh: run over the devices of this mesh (``sharding.make_mesh()``); None: one device.

    Raises ``NonFiniteError`` when the loss or the images stop being finite (checked every
    iteration with a callback, else at the end). For checkpoints, resuming and outputs use
    ``idm_jax.run.condense_and_evaluate``.

    Returns (the condensed set, the final state).
    """
    real = prepare_real(train_images, train_labels, mean, std, num_classes, mesh=mesh)
    engine = make_engine(config, real.num_classes, real.image_shape,
                         max_per_class=real.max_per_class)
    if state is None:
        state = init_state(engine, real, config.seed)
    metrics, done = None, int(state.iteration)
    for done, state, metrics in iterate(engine, real, state, mesh=mesh):
        if callback is not None:
            host = dict(jax.device_get(metrics), iteration=done - 1)
            check_finite(host, done - 1)
            callback(state, host)
    if metrics is not None and callback is None:
        check_finite(jax.device_get(metrics), done - 1)
    return condensed_set(state, real, config.ipc), state


__all__ = ["CondenseState", "shard_state", "synthetic_labels", "Engine", "make_engine",
           "init_synthetic", "init_state", "refresh_queue", "train_queue", "make_step",
           "CondensedSet", "condensed_set", "iterate", "NonFiniteError", "check_finite",
           "condense"]
