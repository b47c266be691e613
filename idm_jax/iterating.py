"""Driving the engine's step: iterations, the NaN/Inf policy and the one-call ``condense``.

``engine.make_step`` builds one jitted outer iteration; this module runs it from a state up to a
count (``iterate``), applies the one NaN/Inf policy (``check_finite``), and offers the minimal
library entry point ``condense`` (no checkpoints: the run loop with checkpoints and outputs is
``idm_jax.runs.run``).
"""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple, Optional

import jax
import numpy as np
from jax.sharding import Mesh

from idm_jax import real as real_lib
from idm_jax.accel import sharding
from idm_jax.base import Method
from idm_jax.config import Config
from idm_jax.engine import (CondenseState, Engine, init_state, make_engine, make_step,
                            shard_state, synthetic_labels)
from idm_jax.real import RealData, prepare_real


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
             mesh: Optional[Mesh] = None,
             method: Optional[Method] = None) -> tuple[CondensedSet, CondenseState]:
    """Condense a labelled uint8 image set with the config's method (IDM by default); the
    minimal library entry point.

    Args:
      config: run configuration (see ``idm_jax.config``).
      train_images: (N, H, W, C) uint8 real images; train_labels: (N,) ints.
      mean, std: per-channel normalisation constants in [0,1] pixel units.
      state: continue from this state (e.g. restored from a checkpoint) instead of a fresh one.
      callback: called as ``callback(state, metrics)`` after every iteration with host metrics
        (and ``iteration``, 0-based); raise from it to stop. Fetching those metrics waits for
        the device each iteration; leave it None to let an accelerator run ahead.
      mesh: run over the devices of this mesh (``sharding.make_mesh()``); None: one device.
      method: a ``base.Method`` object to run instead of the one ``config.method`` names.

    Raises ``NonFiniteError`` when the loss or the images stop being finite (checked every
    iteration with a callback, else at the end). For checkpoints, resuming and outputs use
    ``idm_jax.runs.run.condense_and_evaluate``.

    Returns (the condensed set, the final state).
    """
    real = prepare_real(train_images, train_labels, mean, std, num_classes, mesh=mesh)
    engine = make_engine(config, real.num_classes, real.image_shape, method=method,
                         max_per_class=real.max_per_class,
                         normalization=(mean, std))
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


__all__ = ["CondensedSet", "condensed_set", "iterate", "NonFiniteError", "check_finite",
           "condense"]
