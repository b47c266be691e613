"""The condensation engine: explicit state and one jitted outer iteration of a method.

The engine is built from a method (``base.Method``, ``idm_jax.methods``): its objective, image
optimiser and extractor schedule. One call of the step is one outer iteration; for IDM, one
iteration of the official ``IDM_cifar10.py`` loop (docs/FAITHFULNESS.md, "outer iteration"):

1. refresh the extractors (``schedule.refresh``; IDM: reset the accuracy meters every
   ``eval_interval`` iterations and push a fresh model every ``net_generate_interval``);
2. ``matching.match``, ``train_net_num`` times: one extractor, every class, one image update
   (then, with ``calibration_weight`` > 0, ``matching.calibrate``: a CE pass on the
   schedule's calibration network, NCFM's);
3. train the extractors (``schedule.train``; IDM: ``fetch_net_num`` queue models on real
   batches).

Classes are a vmapped axis, every piece's state is a pytree, and nothing leaves the device. The
same step runs on one device or, given a ``jax.sharding`` mesh, with the class axis split over
several devices (``sharding.ClassLayout``) and the queue trainees data-parallel. The run loop
with checkpoints and outputs is ``idm_jax.runs.run``; ``idm_jax.iterating`` drives the step
(``iterate``, the NaN/Inf policy, ``condense``: the minimal library call).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from idm_jax import classifier, image_update, matching, partition
from idm_jax.accel import backend, memory
from idm_jax.nn import models
from idm_jax import real as real_lib
from idm_jax import validate
from idm_jax.accel import sharding
from idm_jax.base import ExtractorSchedule, ImageOptimizer, Method, Networks, Objective
from idm_jax.config import Config
from idm_jax.real import RealData


# --------------------------------------------------------------------------- state
@flax.struct.dataclass
class CondenseState:
    """Everything a run needs to continue; a checkpoint stores exactly this."""

    images: jax.Array        # (K*ipc, H, W, C) float32 synthetic images (normalised space)
    image_opt_state: Any     # the image optimiser's state (IDM: the momentum buffer, as images)
    extractors: Any          # the extractor schedule's state (IDM: the queue.ModelQueue)
    key: jax.Array           # (2,) uint32 raw PRNG key
    iteration: jax.Array     # () int32, next outer iteration to run

    @staticmethod
    def layout(mesh: Mesh, state) -> "CondenseState":
        """Shardings of ``state`` (or its ``jax.eval_shape``) on ``mesh``: the synthetic rows
        split (replicated when the mesh does not divide them), and so every optimiser leaf of
        their shape; the extractors, key and counter replicated."""
        rep = sharding.replicated(mesh)
        shape = state.images.shape
        row = sharding.rows(mesh, shape[0])
        opt = jax.tree.map(lambda leaf: row if leaf.shape == shape else rep,
                           state.image_opt_state)
        return CondenseState(images=row, image_opt_state=opt, extractors=rep, key=rep,
                             iteration=rep)


def shard_state(state: CondenseState, mesh: Mesh) -> CondenseState:
    """A state (fresh, or restored from any checkpoint) placed on ``mesh``."""
    return sharding.place(state, CondenseState.layout(mesh, state))


def synthetic_labels(num_classes: int, ipc: int) -> jnp.ndarray:
    """Fixed hard labels of the stored set: [0]*ipc + [1]*ipc + ..."""
    return jnp.repeat(jnp.arange(num_classes, dtype=jnp.int32), ipc)


class Engine(NamedTuple):
    """The model, functions and policy a run is built from (static: not part of the state)."""

    config: Config
    model: Any
    optimizer: Any                    # optax transformation that trains an extractor
    init_params: Callable             # key -> params of a fresh model
    apply: Callable                   # (params, images) -> (embedding, logits), float32
    policy: backend.Policy            # device-dependent choices, resolved once
    objective: Objective     # one class's loss (the method's)
    image_optimizer: ImageOptimizer   # how the images move (the method's)
    extractors: ExtractorSchedule     # where the extractors come from (the method's)
    method: Method
    aux_apply: Optional[Callable] = None   # (params, images) -> embedding of the auxiliary
                                           # network (config.auxiliary_model), else None


def make_engine(config: Config, num_classes: int, image_shape, *,
                policy: Optional[backend.Policy] = None,
                method: Optional[Method] = None,
                objective: Optional[Objective] = None,
                max_per_class: Optional[int] = None,
                normalization: Optional[tuple] = None) -> Engine:
    """Build the engine for ``num_classes`` classes of ``image_shape`` (H, W, C) images.

    ``method`` defaults to the one ``config.method`` names (``idm_jax.methods``); ``objective``
    replaces the method's objective. ``policy`` defaults to ``backend.resolve(config.microbatch)``.
    With ``max_per_class`` (the largest class's image count) and the automatic ``microbatch``, an
    accelerator run chunks its network calls to fit the device's memory (``idm_jax.accel.memory``)
    instead of always using whole batches, and a CPU run whose kept activations would not fit
    the host's memory recomputes them (``memory.cpu_needs_remat``). ``normalization`` is the
    data's (mean, std) per channel, which a method that steps pixels needs (``pixel_space``).
    """
    validate.check_config(config, image_shape)    # architectures and partition geometry
    if method is None:
        method = validate.check_method(config)
    channels = image_shape[2]
    automatic = policy is None and config.microbatch == -1
    policy = backend.resolve(config.microbatch) if policy is None else policy
    dtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32
    model = models.get_model(config.model, num_classes, in_channels=channels, dtype=dtype,
                             conv_op=policy.conv_op)
    dummy = jnp.zeros((1,) + tuple(image_shape), jnp.float32)

    def init_params(key):
        return model.init(key, dummy)["params"]

    def apply(params, images):
        embedding, logits = model.apply({"params": params}, images)
        return embedding.astype(jnp.float32), logits.astype(jnp.float32)

    if automatic and max_per_class:
        policy = _memory_policy(config, num_classes, image_shape, max_per_class, policy, apply,
                                init_params)
    optimizer = classifier.sgd(config.lr_net, config.net_momentum,
                                        config.net_weight_decay)
    aux_init, aux_apply = _auxiliary_network(config, num_classes, channels, dtype, policy,
                                             dummy)
    nets = Networks(init_params, apply, optimizer, policy.map_models, policy.chunk, aux_init)
    pieces = _method_pieces(config, num_classes, method, objective, nets, normalization)
    return Engine(config, model, optimizer, init_params, apply, policy, *pieces, method,
                  aux_apply)


def _memory_policy(config: Config, num_classes: int, image_shape, max_per_class: int,
                   policy: backend.Policy, apply, init_params) -> backend.Policy:
    """The automatic policy sized to memory: on CPU, remat only when the kept activations would
    not fit the host; elsewhere whole batches where they fit, else chunks sized to the device."""
    params = jax.eval_shape(init_params, jax.random.PRNGKey(0))
    if policy.platform == "cpu":
        remat = memory.cpu_needs_remat(config, num_classes, image_shape, max_per_class,
                                       apply, params, memory.host_memory_bytes())
        return dataclasses.replace(policy, remat=remat)
    budget = memory.plan(config, num_classes, image_shape, max_per_class, apply,
                         params, memory.device_memory_bytes())
    return dataclasses.replace(policy, chunk=budget.chunk, remat=budget.chunk > 0)


def _method_pieces(config: Config, num_classes: int, method: Method,
                   objective: Optional[Objective], nets: Networks, normalization):
    """The method's (objective, image optimiser, extractor schedule), checked against the
    settings it cannot honour; a pixel-space method's optimiser wrapped to step pixels."""
    try:
        pieces = (method.objective(config) if objective is None else objective,
                  method.image_optimizer(config, num_classes), method.extractors(config, nets))
    except ValueError as err:          # a setting the method cannot use
        raise validate.InvalidRun(str(err)) from None
    if config.calibration_weight > 0 and pieces[2].calibration is None:
        raise validate.InvalidRun(f"--calibration_weight {config.calibration_weight}: the "
                                  f"method {method.name}'s extractors have no calibration "
                                  f"network; set it to 0")
    if method.pixel_space:
        if normalization is None:
            raise ValueError(f"method {method.name} steps pixels: make_engine needs "
                             f"normalization=(mean, std) of the data (RealData.mean, .std)")
        pieces = (pieces[0], image_update.in_pixel_space(pieces[1], *normalization), pieces[2])
    if config.auxiliary_model and pieces[2].auxiliary is None:
        raise validate.InvalidRun(f"--auxiliary_model {config.auxiliary_model}: the method "
                                  f"{method.name}'s extractors give no auxiliary network; "
                                  f"leave it empty")
    return pieces


def _auxiliary_network(config: Config, num_classes: int, channels: int, dtype, policy, dummy):
    """(init, apply -> embedding) of ``config.auxiliary_model``, or (None, None)."""
    if not config.auxiliary_model:
        return None, None
    if config.auxiliary_model not in models.MODEL_NAMES:
        raise validate.InvalidRun(f"--auxiliary_model {config.auxiliary_model!r} is not a known "
                                  f"architecture; valid: {', '.join(models.MODEL_NAMES)}")
    aux = models.get_model(config.auxiliary_model, num_classes, in_channels=channels,
                           dtype=dtype, conv_op=policy.conv_op)

    def aux_apply(params, images):
        return aux.apply({"params": params}, images)[0].astype(jnp.float32)

    return (lambda key: aux.init(key, dummy)["params"]), aux_apply


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
    """Fresh state: the synthetic init, the image optimiser's and the extractor schedule's
    initial states (IDM: zero momentum, a queue of ``initial_models`` random models)."""
    config = engine.config
    key = (jax.random.PRNGKey(seed_or_key) if isinstance(seed_or_key, int)
           else jnp.asarray(seed_or_key))
    key, k_images, k_extractors = jax.random.split(key, 3)
    images = init_synthetic(k_images, config, real)
    # A copy of every leaf: an optimiser whose state holds the images themselves would make the
    # step donate one buffer twice.
    opt_state = jax.tree.map(jnp.array, engine.image_optimizer.init(images))
    return CondenseState(images=images, image_opt_state=opt_state,
                         extractors=engine.extractors.init(k_extractors), key=key,
                         iteration=jnp.asarray(0, jnp.int32))


def state_shapes(engine: Engine, num_classes: int, image_shape) -> CondenseState:
    """The shapes and dtypes of a state (``jax.eval_shape``), without building one."""
    rows = jax.ShapeDtypeStruct((num_classes * engine.config.ipc,) + tuple(image_shape),
                                jnp.float32)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    return CondenseState(images=rows,
                         image_opt_state=jax.eval_shape(engine.image_optimizer.init, rows),
                         extractors=jax.eval_shape(engine.extractors.init, key), key=key,
                         iteration=jax.ShapeDtypeStruct((), jnp.int32))


# --------------------------------------------------------------------------- one iteration
def iteration_keys(key: jax.Array):
    """An iteration's keys from the state's key: (next state key, refresh, matching, trainee
    selection, trainee batches). The step and the diagnostics draw exactly these."""
    return jax.random.split(key, 5)


def match_phase(engine: Engine, r: RealData, images: jax.Array, opt_state, extractors,
                k_match: jax.Array, layout: sharding.ClassLayout):
    """Phase 2 of an iteration: ``train_net_num`` matching passes, then the calibration pass
    if the method has one. Returns (images, image optimiser state, metrics); the extractors'
    state is read, never changed, so several image sets can match against one schedule."""
    metrics = {}
    for match_key in jax.random.split(k_match, engine.config.train_net_num):
        images, opt_state, metrics = matching.match(engine, r, images, opt_state, extractors,
                                                    match_key, layout)
    if engine.config.calibration_weight > 0:     # NCFM: a CE pass on a trained network
        images, opt_state, calibrated = matching.calibrate(
            engine, r, images, opt_state, extractors, jax.random.fold_in(k_match, 1), layout)
        metrics = dict(metrics, **calibrated)
    # The loss is taken before the update, so a blow-up shows in the images one iteration
    # before it shows in the loss (or never, on the last iteration): report both.
    return images, opt_state, dict(
        metrics, images_finite=jnp.all(jnp.isfinite(images)).astype(jnp.float32))


def make_step(engine: Engine, real: RealData, jit: bool = True,
              mesh: Optional[Mesh] = None) -> Callable:
    """The outer iteration ``step(state, real) -> (state, metrics)``.

    With ``jit`` (default) it is compiled once and donates ``state``; ``jit=False`` returns the
    plain function (to wrap it, e.g. with ``chex.assert_max_traces``). With ``mesh``
    (``sharding.make_mesh``) it expects ``real`` placed by ``real.shard_real`` and ``state`` by
    ``shard_state``, and returns the state in that layout. ``metrics`` are device scalars.
    """
    if mesh is not None and real.per_class.shape[0] % sharding.mesh_size(mesh):
        raise ValueError(f"the real data has {real.per_class.shape[0]} classes, which the "
                         f"{sharding.mesh_size(mesh)}-device mesh does not divide; place it "
                         f"with idm_jax.real.shard_real(real, mesh) (it pads the class axis)")
    layout = sharding.ClassLayout(real.num_classes, mesh)

    schedule = engine.extractors

    def step(state: CondenseState, r: RealData):
        # ``r`` is an argument, not a closure constant: the dataset is not baked into the program.
        key, k_refresh, k_match, k_select, k_batch = iteration_keys(state.key)
        extractors = schedule.refresh(state.extractors, state.iteration, k_refresh)
        images, opt_state, metrics = match_phase(engine, r, state.images, state.image_opt_state,
                                                 extractors, k_match, layout)
        extractors, trained = schedule.train(extractors, r, layout, k_select, k_batch)
        return CondenseState(images=images, image_opt_state=opt_state, extractors=extractors,
                             key=key, iteration=state.iteration + 1), dict(metrics, **trained)

    if not jit:
        return step
    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    state_layout = CondenseState.layout(mesh, state_shapes(engine, real.num_classes,
                                                           real.image_shape))
    return jax.jit(step, donate_argnums=0,
                   in_shardings=(state_layout, RealData.layout(mesh)),
                   out_shardings=(state_layout, sharding.replicated(mesh)))


def first_pass_gradient_norms(engine: Engine, real: RealData, state: CondenseState,
                              mesh: Optional[Mesh] = None) -> dict:
    """The gradient norms of the loss and of each term (``matching.term_gradient_norms``) in the
    first matching pass of the iteration ``state`` is at, with the very draws ``make_step``
    makes there. Host floats; a diagnostic (one more compiled program), not part of a step."""
    layout = sharding.ClassLayout(real.num_classes, mesh)

    def norms(state, r):
        _, k_refresh, k_match, _, _ = iteration_keys(state.key)
        extractors = engine.extractors.refresh(state.extractors, state.iteration, k_refresh)
        match_key = jax.random.split(k_match, engine.config.train_net_num)[0]
        return matching.term_gradient_norms(engine, r, state.images, state.image_opt_state,
                                            extractors, match_key, layout)

    return {k: float(v) for k, v in jax.device_get(jax.jit(norms)(state, real)).items()}


__all__ = ["CondenseState", "shard_state", "synthetic_labels", "Engine", "make_engine",
           "init_synthetic", "init_state", "state_shapes", "match_phase", "make_step",
           "first_pass_gradient_norms", "iteration_keys"]
