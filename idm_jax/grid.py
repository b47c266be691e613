"""Several settings of one method condensed together, sharing one extractor schedule.

A method's extractors never see the synthetic images: IDM's queue trains its models on real
batches, and which models it holds, how they learn and which one a matching pass draws follow
from the run's seed alone, whatever the image step size or the CE weight. A grid over those
settings (``SHAREABLE``, what ``experiments.tune`` varies) can therefore refresh and train the
extractors once per iteration and let every setting match against them: each setting keeps its
own images and image optimiser and computes what its own run computes. On a CPU the queue
training is most of an IDM iteration (BENCHMARKS.md), so T settings cost about one run's queue
plus T matchings.

The grid's state is a ``CondenseState`` whose images and image optimiser state carry a leading
axis of settings (T, ...); ``trial_state`` cuts one setting's state out of it, the state its own
run would have at that iteration.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from idm_jax import engine as engine_lib
from idm_jax.accel import sharding
from idm_jax.config import Config
from idm_jax.engine import CondenseState, Engine
from idm_jax.real import RealData

# The settings a grid may vary: they act on the images' update, never on the extractors.
SHAREABLE = ("lr_img", "ce_weight", "calibration_weight")


def check_shareable(configs: Sequence[Config]) -> None:
    """ValueError unless ``configs`` (two or more) differ only in ``SHAREABLE`` fields."""
    if len(configs) < 2:
        raise ValueError(f"a grid needs at least 2 settings, got {len(configs)}")
    first = configs[0].to_dict()
    for config in configs[1:]:
        other = config.to_dict()
        differ = sorted(k for k in set(first) | set(other)
                        if k not in SHAREABLE and first.get(k) != other.get(k))
        if differ:
            raise ValueError(f"settings condensed together may differ only in "
                             f"{', '.join(SHAREABLE)}; these also differ in {', '.join(differ)}")
    if len({c.calibration_weight > 0 for c in configs}) > 1:
        raise ValueError("settings condensed together either all have a calibration pass "
                         "(calibration_weight > 0) or none has")
    if configs[0].eval_every:
        raise ValueError("a grid makes no evaluation during the condensation: eval_every "
                         "must be 0 (each setting is evaluated at its end)")


def _stack(trees):
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def stack_trials(states: Sequence[CondenseState]) -> CondenseState:
    """The grid state of settings' own states at one iteration (``trial_state``'s inverse):
    their images and image optimiser states stacked, the extractors, key and iteration of the
    first. ValueError unless all hold the same key and iteration (one seed, one iteration). The
    extractors are not compared: states of one grid share them by construction, and a caller
    gathering states of separate runs compares them itself (``runs.grid_run``)."""
    first = jax.device_get((states[0].key, states[0].iteration))
    for state in states[1:]:
        if not all(np.array_equal(a, b) for a, b in
                   zip(first, jax.device_get((state.key, state.iteration)))):
            raise ValueError("the settings' states are not at one iteration of one seed")
    return states[0].replace(images=jnp.stack([s.images for s in states]),
                             image_opt_state=_stack([s.image_opt_state for s in states]))


def init_grid_state(engines: Sequence[Engine], real: RealData, seed: int) -> CondenseState:
    """Every setting's fresh state (``engine.init_state``) stacked (``stack_trials``)."""
    first = engine_lib.init_state(engines[0], real, seed)
    # The init draws nothing from the shareable settings: every setting starts from the same
    # images; each optimiser's state is initialised as ``engine.init_state`` does it.
    return stack_trials([first] + [
        first.replace(image_opt_state=jax.tree.map(jnp.array,
                                                   e.image_optimizer.init(first.images)))
        for e in engines[1:]])


def trial_state(state: CondenseState, t: int) -> CondenseState:
    """Setting ``t``'s state: what its own run holds at ``state.iteration``."""
    return state.replace(images=state.images[t],
                         image_opt_state=jax.tree.map(lambda leaf: leaf[t],
                                                      state.image_opt_state))


def make_grid_step(engines: Sequence[Engine], real: RealData, jit: bool = True) -> Callable:
    """The outer iteration of a grid, ``step(state, real) -> (state, metrics)``, on one device.

    The phases of ``engine.make_step``, with the matching phase once per setting: refresh the
    extractors; for each setting t, ``engine.match_phase`` on its images with its engine and the
    iteration's matching key; train the extractors. ``metrics`` holds each setting's matching
    metrics stacked (T,) and the extractor training's scalars.
    """
    check_shareable([e.config for e in engines])
    layout = sharding.ClassLayout(real.num_classes, None)
    schedule = engines[0].extractors

    def step(state: CondenseState, r: RealData):
        key, k_refresh, k_match, k_select, k_batch = engine_lib.iteration_keys(state.key)
        extractors = schedule.refresh(state.extractors, state.iteration, k_refresh)
        images, opt_states, matched = [], [], []
        for t, eng in enumerate(engines):
            own = trial_state(state, t)
            out = engine_lib.match_phase(eng, r, own.images, own.image_opt_state, extractors,
                                         k_match, layout)
            images.append(out[0])
            opt_states.append(out[1])
            matched.append(out[2])
        extractors, trained = schedule.train(extractors, r, layout, k_select, k_batch)
        metrics = dict(_stack(matched), **trained)
        return CondenseState(images=jnp.stack(images), image_opt_state=_stack(opt_states),
                             extractors=extractors, key=key,
                             iteration=state.iteration + 1), metrics

    return jax.jit(step, donate_argnums=0) if jit else step


__all__ = ["SHAREABLE", "check_shareable", "stack_trials", "init_grid_state", "trial_state",
           "make_grid_step"]
