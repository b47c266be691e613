"""Making a pool of pretrained networks as a resumable job (``experiments.pretrain``).

Pretraining IID's ResNet-18s takes hours on a CPU, so the job keeps its place: after a block
of SGD steps, at most every ``save_every_s`` seconds and whenever a signal asks it to stop
(``runs.stop``), it writes ``progress.npz`` into the pool's folder: the networks, their
optimiser state, where in which epoch they are, and the settings that made them. Running the
same command again continues from there and ends bit-identical to an uninterrupted job; when
the pool is written, the progress file goes. A folder that holds a pool, or the progress of
one, made with other settings is refused before any work rather than overwritten.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
import zipfile
from typing import Callable, Optional

import jax
import numpy as np

from idm_jax import data, pretrain
from idm_jax.runs import outputs
from idm_jax.runs import workdir as workdir_lib
from idm_jax.runs.failures import UserError
from idm_jax.runs.stop import Interrupted, StopRequest

PROGRESS_FILE = "progress.npz"
# What decides a pool's weights; a job continues a folder only when all of them agree.
SETTINGS = ("recipe", "model", "dataset", "num_models", "settings", "seed", "validation")


def _settings(meta: dict) -> dict:
    return json.loads(json.dumps({k: meta.get(k) for k in SETTINGS}))   # tuples as lists


def _refuse_other_settings(out: str, found: dict, wanted: dict, what: str) -> None:
    differ = sorted(k for k in SETTINGS if found.get(k) != wanted[k])
    if differ:
        raise UserError(f"--out {out} already holds {what} made with other settings (differs in "
                        f"{', '.join(differ)}); give another --out or remove that folder")


def _read_progress(out: str, wanted: dict) -> Optional[dict]:
    """The saved progress in ``out`` for these settings (named arrays), or None. A progress
    file that cannot be read is moved aside with a warning and the job starts over."""
    path = os.path.join(out, PROGRESS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path) as stored:
            arrays = {k: stored[k] for k in stored.files}
        found = json.loads(str(arrays.pop("settings")))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as err:
        _set_aside(path, f"could not be read ({type(err).__name__})")
        return None
    _refuse_other_settings(out, found, wanted, "the progress of a pool")
    return arrays


def _set_aside(path: str, why: str) -> None:
    aside = path + ".damaged"
    os.replace(path, aside)
    print(f"warning: {path} {why}; moved to {aside}, pretraining starts over", file=sys.stderr)


def _finished(out: str, wanted: dict) -> Optional[dict]:
    """The record (pool.json) of the finished pool in ``out``, None if there is none; a pool of
    other settings is refused."""
    path = os.path.join(out, "pool.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        finished = json.load(f)
    _refuse_other_settings(out, _settings(finished), wanted, "a pool")
    return finished


def _lock(stack: contextlib.ExitStack, out: str) -> None:
    """One job per pool folder: two would rename each other's half-written files."""
    os.makedirs(out, exist_ok=True)
    try:
        stack.enter_context(workdir_lib.lock(out))
    except workdir_lib.WorkdirBusy:
        raise UserError(f"--out {out} is in use by another pretraining; wait for it to end or "
                        f"give another --out") from None


def _write_progress(out: str, at: pretrain.PoolProgress, settings: dict) -> None:
    """``progress.npz`` written whole or not at all (a temporary file, then a rename)."""
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, "progress.tmp.npz")
    np.savez(tmp, settings=np.asarray(json.dumps(settings)), **pretrain.progress_arrays(at))
    os.replace(tmp, os.path.join(out, PROGRESS_FILE))


def pretrain_pool(out: str, dataset: data.Dataset, recipe_name: str, recipe: pretrain.Recipe,
                  num_models: int, seed: int = 0, validation_per_class: int = 0,
                  validation_seed: int = 0,
                  progress: Optional[Callable[[int, int], None]] = None,
                  save_every_s: float = 60.0, stop_request: Optional[StopRequest] = None) -> dict:
    """Train the pool (``pretrain.train_pool``) into ``out`` (``pool.npz``, ``pool.json``),
    continuing a saved progress of the same settings. Returns the pool's record (pool.json);
    a finished pool of the same settings is returned as it is, without training.

    Raises ``UserError`` if ``out`` holds a pool or progress of other settings, and
    ``Interrupted`` (after saving the progress) when a signal asks the job to stop.
    """
    _, split = data.split_validation(dataset, validation_per_class, validation_seed)
    meta = {"recipe": recipe_name, "model": recipe.model, "dataset": dataset.name,
            "num_models": num_models, "settings": dataclasses.asdict(recipe), "seed": seed,
            "validation": split.record() if split is not None else None}
    wanted = _settings(meta)
    finished = _finished(out, wanted)
    if finished is not None:
        return finished
    last_save, steps_done = time.monotonic(), 0

    def count(done: int, total: int) -> None:
        nonlocal steps_done
        steps_done = done
        if progress is not None:
            progress(done, total)

    def after_block(at: pretrain.PoolProgress) -> None:
        nonlocal last_save
        stopping = interrupt.requested
        if stopping or time.monotonic() - last_save >= save_every_s:
            _write_progress(out, at, wanted)
            last_save = time.monotonic()
        if stopping:
            raise Interrupted(steps_done, out, interrupt.signum, unit="step")

    def train(resume):
        return pretrain.train_pool(dataset, recipe, num_models, jax.random.PRNGKey(seed),
                                   validation_per_class, validation_seed, progress=count,
                                   resume=resume, after_block=after_block)

    with contextlib.ExitStack() as stack:
        _lock(stack, out)
        resume = _read_progress(out, wanted)
        interrupt = stack.enter_context(stop_request or StopRequest())
        try:
            pool = train(resume)
        except ValueError as err:
            if resume is None or "the saved progress" not in str(err):
                raise
            # Arrays of another shape or name: a progress written by another version.
            _set_aside(os.path.join(out, PROGRESS_FILE), "does not fit this version's networks")
            pool = train(None)
        meta.update(code_version=outputs.code_version(), processor=outputs.processor())
        pretrain.save_pool(out, pool, meta)
        if os.path.exists(os.path.join(out, PROGRESS_FILE)):
            os.remove(os.path.join(out, PROGRESS_FILE))
    return _finished(out, wanted)


__all__ = ["PROGRESS_FILE", "pretrain_pool"]
