"""Condensing a grid of settings together (``idm_jax.grid``), each left as its own run.

``condense_grid`` runs the settings of a tuning grid with one extractor schedule between them
and leaves each setting's folder as its own run would be after its last iteration: its final
checkpoint, ``metrics.jsonl``, ``sessions.jsonl``, ``config.json`` and, with
``record_grad_norms``, ``grad_norms.json``; plus ``grid.json`` saying it was condensed in a grid.
``run.condense_and_evaluate`` on that folder then finds the run done and only evaluates it, so
a grid's results are read, tabled and resumed like any run's. Each setting's images and
optimiser state are the very ones its own run computes (``tests/test_grid.py`` checks them
bit for bit against separate runs).

The grid keeps its own checkpoints in ``grid_dir`` and resumes from them, or, when it has none,
from its settings' own newest checkpoints if all stopped at one iteration (a grid re-run with
more ``iterations`` continues where it ended); a setting whose loss or
images stop being finite gets ``failed.json`` (what ``runs.tuning`` records for a failed run)
and the others go on. The seconds logged per iteration are the grid's, divided among its
settings.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from idm_jax import config as config_lib
from idm_jax import data, engine, grid, iterating, methods
from idm_jax.config import Config
from idm_jax.runs import checkpoint, outputs, study
from idm_jax.runs import workdir as workdir_lib
from idm_jax.runs import window as window_lib
from idm_jax.runs.run import GRAD_NORMS_FILE, prepare_data
from idm_jax.runs.stop import Interrupted, StopRequest
FAILED_FILE = "failed.json"      # a setting whose loss or images stopped being finite
GRID_FILE = "grid.json"          # in each setting's folder: condensed in a grid, with whom
MEMBERS_FILE = "members.json"    # in the grid's folder: its settings' folders, in order


def _label(config: Config) -> dict:
    return {k: getattr(config, k) for k in grid.SHAREABLE}


def _start_trials(configs, directories, meta: dict, start_it: int, grid_dir: str) -> list:
    """Each setting's folder as a run's at ``start_it``: its log trimmed to it, this session
    recorded, its config written. Returns the open metrics logs."""
    logs = []
    for config, directory in zip(configs, directories):
        workdir_lib.trim_metrics(directory, start_it)
        workdir_lib.record_session(directory, config.to_dict(), start_it)
        checkpoint.dump_json(os.path.join(directory, "config.json"),
                             dict(config.to_dict(), data=meta))
        checkpoint.dump_json(os.path.join(directory, GRID_FILE),
                             {"grid_dir": os.path.abspath(grid_dir),
                              "settings": [_label(c) for c in configs]})
        logs.append(outputs.MetricsLog(os.path.join(directory, "metrics.jsonl")))
    return logs


def _log_iteration(configs, directories, logs, metrics: dict, it: int, seconds: float,
                   failed: dict) -> None:
    """One line per setting still finite; a setting that stops being finite gets failed.json."""
    for t, (config, directory, log) in enumerate(zip(configs, directories, logs)):
        if t in failed:
            continue
        record = {k: float(v[t] if getattr(v, "ndim", 0) else v) for k, v in metrics.items()}
        record.update(iteration=it, seconds=seconds / len(configs))
        log.write(record)
        try:
            iterating.check_finite(record, it)
        except iterating.NonFiniteError as err:
            failed[t] = f"{err} (condensed in a grid of {len(configs)} settings)"
            record_failure(config, directory, failed[t])


def _set_aside_failed(state, failed: dict):
    """Zeros for the images and optimiser state of the settings that failed: their results are
    no longer read, and the grid's checkpoints stay finite (a restore refuses NaN images)."""
    rows = jnp.asarray(sorted(failed))

    def zero(leaf):
        return leaf.at[rows].set(0)

    return state.replace(images=zero(state.images),
                         image_opt_state=jax.tree.map(zero, state.image_opt_state))


def record_failure(config: Config, directory: str, why: str) -> dict:
    """Write and return the ``failed.json`` record of a run of ``config`` that stopped being
    finite (``failed_record`` reads it)."""
    record = {"failed": why, "config": config.to_dict()}
    os.makedirs(directory, exist_ok=True)      # a run that failed at once left no folder
    checkpoint.dump_json(os.path.join(directory, FAILED_FILE), record)
    return record


def failed_record(config: Config, directory: str) -> Optional[dict]:
    """The ``failed.json`` record (``{"failed": why, "config": ...}``) in ``directory`` that
    holds for ``config``, or None. It holds for the same result-changing settings and at least
    as many iterations: a run is deterministic, so one that failed within fewer iterations
    fails again within more."""
    path = os.path.join(directory, FAILED_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        record = json.load(f)
    saved = record.get("config", {})
    same = not config_lib.result_differences(saved, config)
    return record if same and saved.get("iterations", 0) <= config.iterations else None


def settled(config: Config, directory: str) -> bool:
    """Finished, recorded as failed, or condensed to its last iteration (only its
    evaluation left)."""
    if failed_record(config, directory) or study.finished(directory, config) is not None:
        return True
    return os.path.isdir(os.path.join(directory, "checkpoints", str(config.iterations)))


def _foreign(config: Config, directory: str) -> bool:
    """The folder holds a run of other result-changing settings (its config.json says so):
    it is left to the separate path, which refuses or resumes it as any run."""
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return bool(config_lib.result_differences(json.load(f), config))


def members(configs: Sequence[Config], directories: Sequence[str], grid_dir: str) -> list[int]:
    """The settings the grid condenses: those recorded by an unfinished grid in ``grid_dir``
    (settings that failed since stay in it, so its checkpoints still fit), else every one that
    is not settled and whose folder holds no run of other settings; when some of those were
    condensed before (their own checkpoints) and not all to one iteration, only those that were
    not."""
    pending = [i for i, (c, d) in enumerate(zip(configs, directories))
               if not settled(c, d) and not _foreign(c, d)]
    record = os.path.join(grid_dir, MEMBERS_FILE)
    if os.path.exists(record) and os.path.isdir(os.path.join(grid_dir, "checkpoints")):
        with open(record) as f:
            names = json.load(f)
        folders = [os.path.abspath(d) for d in directories]
        if all(n in folders for n in names) and {folders[i] for i in pending} <= set(names):
            return [folders.index(n) for n in names]
    begun = {i: _own_latest(directories[i]) for i in pending}
    if len(set(begun.values())) > 1:
        # Own runs stopped at different iterations resume on their own; the others start.
        pending = [i for i in pending if begun[i] is None]
    return pending


def _own_latest(directory: str) -> Optional[int]:
    """The newest iteration of a setting's own checkpoints (a grid condensed to fewer
    iterations left them, or a separate run), or None."""
    return max(outputs.saved_steps(os.path.join(directory, "checkpoints")), default=None)


def condense_grid(configs: Sequence[Config], dataset: data.Dataset,
                  directories: Sequence[str], grid_dir: str, quiet: bool = False) -> dict:
    """Condense the ``members`` of ``configs`` (settings of one method and seed that differ only
    in ``grid.SHAREABLE``) together; leave each in its directory as a run done condensing.

    The grid starts from its own newest checkpoint, else from its settings' own ones when all
    stopped at one iteration (e.g. a grid condensed before to fewer ``iterations``), else fresh.
    Returns {directory of a setting that stopped being finite: why}; nothing is done when fewer
    than 2 settings are left. Raises ValueError (settings that cannot share, data that cannot
    make the run), ``workdir.WorkdirBusy`` and ``Interrupted`` (a signal; the grid's checkpoint
    is saved, calling again resumes).
    """
    chosen = members(configs, directories, grid_dir)
    if len(chosen) < 2:
        return {}
    print(f"== condensing {len(chosen)} settings together, sharing their extractors "
          f"-> {grid_dir}")
    configs = [configs[i] for i in chosen]
    directories = [os.path.abspath(directories[i]) for i in chosen]
    grid.check_shareable(configs)
    dataset, _, real = prepare_data(configs[0], dataset)
    engines = [engine.make_engine(c, real.num_classes, real.image_shape,
                                  max_per_class=real.max_per_class,
                                  normalization=(dataset.mean, dataset.std)) for c in configs]
    meta = checkpoint.data_meta(real, methods.provenance(configs[0].method))
    grid_meta = dict(meta, grid=[_label(c) for c in configs])
    with contextlib.ExitStack() as stack:
        for directory in (grid_dir, *directories):
            os.makedirs(directory, exist_ok=True)
            stack.enter_context(workdir_lib.lock(directory))
        state, saver = _grid_start(stack, engines, real, grid_dir, grid_meta, directories,
                                   meta)
        checkpoint.dump_json(os.path.join(grid_dir, MEMBERS_FILE), directories)
        start_it = int(state.iteration)
        logs = _start_trials(configs, directories, meta, start_it, grid_dir)
        for log in logs:
            stack.callback(log.close)
        if configs[0].record_grad_norms and start_it == 0:
            for t, (eng, directory) in enumerate(zip(engines, directories)):
                norms = engine.first_pass_gradient_norms(eng, real, grid.trial_state(state, t))
                checkpoint.dump_json(os.path.join(directory, GRAD_NORMS_FILE), norms)
        failed = {t: "failed before" for t, (c, d) in enumerate(zip(configs, directories))
                  if failed_record(c, d)}
        state = _iterate(configs, directories, engines, real, state, logs, saver, grid_meta,
                         failed, quiet)
        for t, (c, directory) in enumerate(zip(configs, directories)):
            if t not in failed:
                own = checkpoint.Checkpointer(os.path.join(directory, "checkpoints"),
                                              keep=c.keep_checkpoints)
                own.save(grid.trial_state(state, t), c, meta)
                own.close()
        saver.close()
        shutil.rmtree(os.path.join(grid_dir, "checkpoints"), ignore_errors=True)
    return {directories[t]: why for t, why in failed.items()}


def _grid_start(stack, engines, real, grid_dir: str, grid_meta: dict, directories, meta):
    """The grid's state: its newest checkpoint if one fits these settings (a grid of other
    settings is removed), else ``_from_own_checkpoints``, else a fresh one.
    Returns (state, the grid's checkpointer)."""
    directory = os.path.join(grid_dir, "checkpoints")
    config = engines[0].config
    saver = checkpoint.Checkpointer(directory, keep=2)
    state = grid.init_grid_state(engines, real, config.seed)
    try:
        restored, _ = saver.restore_latest(state, config, grid_meta)
    except checkpoint.CheckpointMismatchError:
        saver.close()
        shutil.rmtree(directory)
        saver, restored = checkpoint.Checkpointer(directory, keep=2), None
    stack.callback(saver.close)
    if restored is None:
        restored = _from_own_checkpoints(engines, directories, meta, state)
    return (state if restored is None else restored), saver


def _from_own_checkpoints(engines, directories, meta: dict, fresh):
    """The grid's state stacked from its settings' own newest checkpoints, when every one has
    a readable checkpoint of its settings and all are at one iteration; else None."""
    if any(_own_latest(d) is None for d in directories):
        return None
    states = []
    for t, (eng, directory) in enumerate(zip(engines, directories)):
        own = checkpoint.Checkpointer(os.path.join(directory, "checkpoints"),
                                      keep=eng.config.keep_checkpoints)
        try:
            restored, _ = own.restore_latest(grid.trial_state(fresh, t), eng.config, meta)
        except checkpoint.CheckpointMismatchError:
            restored = None
        finally:
            own.close()
        if restored is None:
            print(f"the grid starts from iteration 0: {directory} holds no readable checkpoint "
                  f"of its settings")
            return None
        states.append(restored)
    digests = {json.dumps(checkpoint.state_digest(s.extractors), sort_keys=True) for s in states}
    if len(digests) > 1 or len({int(s.iteration) for s in states}) > 1:
        print("the grid starts from iteration 0: its settings' own runs hold different "
              "extractors or iterations")
        return None
    state = grid.stack_trials(states)
    print(f"resuming the grid from its settings' own checkpoints at iteration "
          f"{int(state.iteration)}")
    return state


def _iterate(configs, directories, engines, real, state, logs, saver, grid_meta,
             failed: dict, quiet: bool):
    """The grid's iterations with its checkpoints and stop signals, the metrics fetched in
    windows (``window.MetricsWindow``); the grid's last state is saved too. Fills ``failed``
    (setting -> why) and returns the final state."""
    config = configs[0]
    step = grid.make_grid_step(engines, real)
    size = window_lib.log_window(config, engines[0].policy.platform)
    window = window_lib.MetricsWindow(
        lambda it, values, seconds: _log_iteration(configs, directories, logs, values, it,
                                                   seconds, failed))
    bar = None if quiet else outputs.progress_bar(config, int(state.iteration), False)
    if bar is not None:
        bar.set_description(f"grid of {len(configs)}")
    try:
        with StopRequest() as interrupt:
            it = int(state.iteration)
            while it < config.iterations:
                state, metrics = step(state, real)
                window.add(it, metrics)
                it += 1
                stopping = interrupt.requested
                save = stopping or it % config.checkpoint_every == 0 or it == config.iterations
                if not (save or len(window) >= size):
                    continue
                flushed = window.flush()
                if failed:
                    state = _set_aside_failed(state, failed)
                if bar is not None:
                    bar.update(flushed)
                if save:
                    saver.save(state, config, grid_meta)
                if stopping:
                    raise Interrupted(it, saver.directory, interrupt.signum or signal.SIGINT)
    finally:
        if bar is not None:
            bar.close()
    return state


__all__ = ["FAILED_FILE", "GRID_FILE", "MEMBERS_FILE", "record_failure", "failed_record",
           "settled", "members",
           "condense_grid"]
