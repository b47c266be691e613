"""Checkpoints of a condensation run (orbax) and the portable export of a condensed set (.npz).

A checkpoint holds the whole ``CondenseState`` (images, momentum, the queue with its optimiser
states and meters, the PRNG key, the iteration) plus the run's config and data shape as JSON, so
a restarted run continues bit for bit. A checkpoint written for another dataset, ipc, model or
image size is refused with a message, never silently mixed into the current run.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from idm_jax.config import Config

# Fields that decide what the state *is*; any difference makes a checkpoint unusable.
IDENTITY_FIELDS = ("dataset", "ipc", "model", "net_num", "partition_factor", "compute_dtype")


class CheckpointMismatchError(ValueError):
    """The checkpoint on disk belongs to a different run configuration."""


class Checkpointer:
    """Save and restore ``CondenseState`` under ``directory`` (one sub-folder per iteration)."""

    def __init__(self, directory: str, keep: int = 3):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def save(self, state, config: Config, data_meta: dict, wait: bool = True) -> int:
        """Save ``state`` at its iteration; returns that iteration number."""
        step = int(state.iteration)
        meta = {"config": config.to_dict(), "data": data_meta}
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        if wait:
            self._manager.wait_until_finished()
        return step

    def check_compatible(self, step: int, config: Config, data_meta: dict) -> None:
        """Raise ``CheckpointMismatchError`` if checkpoint ``step`` is from another run."""
        meta = self._read_meta(step)
        saved, problems = meta.get("config", {}), []
        for field in IDENTITY_FIELDS:
            if saved.get(field) != getattr(config, field):
                problems.append(f"{field}: checkpoint {saved.get(field)!r}, "
                                f"now {getattr(config, field)!r}")
        for field, value in data_meta.items():
            if meta.get("data", {}).get(field) != value:
                problems.append(f"{field}: checkpoint {meta.get('data', {}).get(field)!r}, "
                                f"now {value!r}")
        if problems:
            raise CheckpointMismatchError(
                f"the checkpoint in {self.directory} (iteration {step}) was written by a different "
                f"run ({'; '.join(problems)}). Use another --workdir, or delete that folder to "
                f"start over.")
        changed = [f for f, v in config.to_dict().items() if f in saved and saved[f] != v]
        if changed:
            warnings.warn(f"resuming with changed settings {changed}; the continued run is not "
                          f"the same as an uninterrupted one")

    def restore(self, template, config: Config, data_meta: dict, step: Optional[int] = None):
        """Restore the state at ``step`` (default: latest) shaped like ``template``.

        ``template`` is a state of the current run (e.g. a fresh ``init_state``); only its
        structure, shapes and dtypes are used.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        self.check_compatible(step, config, data_meta)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract)))
        except Exception as err:  # orbax raises many types for damaged files
            raise CheckpointMismatchError(
                f"checkpoint {os.path.join(self.directory, str(step))} could not be read "
                f"({type(err).__name__}: {err}). It may be damaged or from another version: "
                f"delete that folder to fall back to an earlier one, or start over.") from err
        return restored.state

    def _read_meta(self, step: int) -> dict:
        try:
            return self._manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore())).meta
        except Exception as err:
            raise CheckpointMismatchError(
                f"checkpoint {os.path.join(self.directory, str(step))} has no readable metadata "
                f"({type(err).__name__}). Delete that folder or use another --workdir.") from err

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def export_npz(path: str, images, labels, mean, std, **extra) -> None:
    """Write a condensed set for any framework: images in [0,1] (de-normalised), NHWC float32.

    Keys: ``images`` (N, H, W, C) float32 in [0,1] pixel units (clipped), ``labels`` (N,) int32,
    ``mean`` and ``std`` (C,) normalisation constants, ``images_normalized`` (the exact stored
    values, which ``(images - mean) / std`` only reproduces up to clipping), plus ``extra``.
    """
    images = np.asarray(images, np.float32)
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    pixels = np.clip(images * std + mean, 0.0, 1.0)
    tmp = path + ".tmp.npz"
    np.savez(tmp, images=pixels, images_normalized=images, labels=np.asarray(labels, np.int32),
             mean=mean, std=std, **extra)
    os.replace(tmp, path)  # never leave a half-written file under the final name


def load_npz(path: str) -> dict:
    """Read an exported set; returns a dict with at least images, labels, mean, std."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no condensed set at {path}")
    with np.load(path) as data:
        out = {k: data[k] for k in data.files}
    missing = {"images", "labels"} - set(out)
    if missing:
        raise ValueError(f"{path} lacks {sorted(missing)}; expected the keys written by "
                         f"idm_jax.checkpoint.export_npz (images in [0,1] NHWC, labels)")
    if out["images"].ndim != 4 or out["labels"].shape != out["images"].shape[:1]:
        raise ValueError(f"{path}: images must be (N, H, W, C) and labels (N,), got "
                         f"{out['images'].shape} and {out['labels'].shape}")
    return out


def data_meta(real) -> dict:
    """What a checkpoint records about the data it was made from."""
    return {"image_shape": list(real.image_shape), "num_classes": int(real.num_classes)}


def dump_json(path: str, value) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


__all__ = ["Checkpointer", "CheckpointMismatchError", "export_npz", "load_npz", "data_meta",
           "IDENTITY_FIELDS"]
