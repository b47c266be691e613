"""Checkpoints of a condensation run (orbax), verified on restore.

A checkpoint holds the whole ``CondenseState`` (images, momentum, the queue with its optimiser
states and meters, the PRNG key, the iteration) plus, as JSON, the run's config, the data's shape
and a SHA-256 digest of every saved array, so a restarted run continues bit for bit and a
damaged checkpoint cannot pass for a good one:

- ``restore`` reads one checkpoint and raises ``CheckpointDamagedError`` when it is unreadable,
  fails its digest or holds non-finite images;
- ``restore_latest`` resumes from the newest checkpoint that passes, moving each damaged newer
  one into ``<directory>-damaged/`` with one warning line (intact checkpoints are never removed);
- a checkpoint written with settings that change the result (``config.result_differences``) is
  refused with ``CheckpointMismatchError``, never silently continued.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from typing import Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from idm_jax.accel import sharding
from idm_jax.config import Config, result_differences


# The layout of the saved state: 2 since methods (images, image_opt_state, extractors, key,
# iteration); checkpoints before it (images, momentum, queue, ...) carry no number.
STATE_FORMAT = 2


class CheckpointMismatchError(ValueError):
    """The checkpoint on disk was made by a run with other result-changing settings or data."""


class CheckpointDamagedError(ValueError):
    """The checkpoint cannot be read, fails its digest, or holds non-finite images."""


def state_digest(state) -> dict[str, str]:
    """SHA-256 of each array of ``state`` (dtype, shape and bytes), keyed by its tree path.

    Independent of the device layout: arrays are gathered whole to the host first (a collective
    with several hosts, so every host calls it).
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(sharding.to_host(state))
    digest = {}
    for path, leaf in leaves:
        array = np.asarray(leaf, order="C")
        h = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
        h.update(array.tobytes())
        digest[jax.tree_util.keystr(path)] = h.hexdigest()
    return digest


class _QuietDamagedReads(logging.Filter):
    """Drop asyncio's "Future exception was never retrieved" dumps of a failed TensorStore read
    (dozens of lines of spec per array): ``restore`` reports the damage in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("Future exception was never retrieved" in message
                    and ("tensorstore" in message or "OCDBT" in message))


logging.getLogger("asyncio").addFilter(_QuietDamagedReads())


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


class Checkpointer:
    """Save and restore ``CondenseState`` under ``directory`` (one sub-folder per iteration)."""

    def __init__(self, directory: str, keep: int = 3):
        self.directory = os.path.abspath(directory)
        self.keep = keep
        self._manager = self._open()

    def _open(self):
        return ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=self.keep,
                                                                 create=True))

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, state, config: Config, data_meta: dict, wait: bool = True) -> int:
        """Save ``state`` at its iteration with its digest; returns that iteration number."""
        step = int(state.iteration)
        meta = {"config": config.to_dict(), "data": data_meta, "digest": state_digest(state),
                "state_format": STATE_FORMAT}
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        if wait:
            self._manager.wait_until_finished()
        return step

    def check_compatible(self, step: int, config: Config, data_meta: dict) -> None:
        """Raise ``CheckpointMismatchError`` if checkpoint ``step`` was made with result-changing
        settings (``config.result_differences``) or data other than these."""
        meta = self._read_meta(step)
        if meta.get("state_format") != STATE_FORMAT:
            raise CheckpointMismatchError(
                f"the checkpoint in {self.directory} (iteration {step}) was written by an older "
                f"idm-jax, whose state (a momentum buffer and a queue) this version stores "
                f"differently; finish that run with the version that made it, use another "
                f"--workdir, or pass --restart to set it aside and start over")
        problems = result_differences(meta.get("config", {}), config)
        saved_data = meta.get("data", {})
        problems += [f"{field}: {saved_data.get(field)!r} -> {value!r}"
                     for field, value in data_meta.items() if saved_data.get(field) != value]
        if problems:
            raise CheckpointMismatchError(
                f"the checkpoint in {self.directory} (iteration {step}) was made with settings "
                f"or data that change the result ({'; '.join(problems)}). Resume with the "
                f"checkpoint's settings, use another --workdir, or pass --restart to set the "
                f"old run aside and start over")

    def restore(self, template, config: Config, data_meta: dict, step: Optional[int] = None):
        """Restore and verify the state at ``step`` (default: latest), shaped like ``template``.

        ``template`` is a state of the current run (e.g. a fresh ``init_state``; sharded, to
        restore straight onto a mesh); only its structure, shapes, dtypes and placement are used.
        Raises ``CheckpointMismatchError`` (another run) or ``CheckpointDamagedError``.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        self.check_compatible(step, config, data_meta)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        problem = None
        try:
            state = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract))).state
        except Exception as err:  # orbax raises many types for damaged files
            first_line = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            problem = f"{type(err).__name__}: {first_line}"
        # Every host takes the same branch before the collectives below.
        if sharding.any_host(problem is not None):
            raise CheckpointDamagedError(f"checkpoint {self.path(step)} cannot be read "
                                         f"({problem or 'on another host'})")
        saved = self._read_meta(step).get("digest")
        if saved is not None:       # checkpoints of older versions carry none
            actual = state_digest(state)
            bad = [k for k in sorted(set(saved) | set(actual)) if saved.get(k) != actual.get(k)]
            if bad:
                raise CheckpointDamagedError(
                    f"checkpoint {self.path(step)} fails its digest (in {', '.join(bad[:3])})")
        if not np.isfinite(sharding.to_host(state.images)).all():
            raise CheckpointDamagedError(f"checkpoint {self.path(step)} holds non-finite images")
        return state

    def restore_latest(self, template, config: Config, data_meta: dict,
                       warn: Callable[[str], None] = _warn):
        """The newest checkpoint that passes ``restore``, as ``(state, step)``; ``(None, None)``
        when there is none.

        A damaged checkpoint is moved to ``<directory>-damaged/<step>`` (``warn`` says which and
        why, in one line) and the next older one is tried. A checkpoint of another run raises
        ``CheckpointMismatchError`` at once: falling back past it would mix two runs.
        """
        for step in reversed(self.all_steps()):
            try:
                return self.restore(template, config, data_meta, step), step
            except CheckpointDamagedError as err:
                moved = self._set_aside(step)
                warn(f"{err}; moved to {moved}, trying the one before it")
        return None, None

    def _set_aside(self, step: int) -> str:
        self._manager.wait_until_finished()
        self._manager.close()
        target = os.path.join(self.directory + "-damaged", str(step))
        suffix = 1
        while os.path.exists(target):
            target = os.path.join(self.directory + "-damaged", f"{step}.{suffix}")
            suffix += 1
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(self.path(step), target)
        sharding.sync_hosts(f"idm_jax: checkpoint {step} set aside")
        self._manager = self._open()
        return target

    def _read_meta(self, step: int) -> dict:
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore())).meta
        except Exception as err:
            meta = err
        if not isinstance(meta, dict):
            reason = type(meta).__name__ if isinstance(meta, Exception) else "empty"
            raise CheckpointDamagedError(f"checkpoint {self.path(step)} has no readable "
                                         f"metadata ({reason})")
        return meta

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def data_meta(real, method_provenance: Optional[dict] = None) -> dict:
    """What a checkpoint records about the data it was made from, and of a method loaded from a
    file its path and source hash (``methods.provenance``): a resume must match all of it."""
    return {"image_shape": list(real.image_shape), "num_classes": int(real.num_classes),
            **(method_provenance or {})}


def write_text(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` in one step: a reader (or a run killed while writing)
    sees the old file or the new one, never a part of it."""
    tmp = f"{path}.{os.getpid()}.tmp"       # two writers of one path never share it
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def dump_json(path: str, value) -> None:
    """``value`` as indented JSON with sorted keys, written as ``write_text`` does; a value
    JSON cannot hold raises TypeError and leaves ``path`` as it was."""
    write_text(path, json.dumps(value, indent=2, sort_keys=True))


__all__ = ["STATE_FORMAT", "Checkpointer", "CheckpointMismatchError", "CheckpointDamagedError",
           "state_digest", "data_meta", "write_text", "dump_json"]
