"""Everything about a run that can be checked before any work, with messages that name the flag.

A condensation at the paper budget runs for hours; a setting that cannot work must fail before
the first iteration (and, where it depends only on the config and the image shape, before a big
dataset is loaded), not after it. ``check_config`` needs only the config and, optionally, the
image shape; ``check_data`` checks what the loaded training set must hold for the config;
``check_workdir`` the run folder. Each raises ``InvalidRun`` with one sentence that starts with
the flag (``--FIELD``) or the file at fault. ``engine.make_engine`` calls ``check_config``, so
library callers get the same messages.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from idm_jax import augment, methods, partition
from idm_jax.nn import models
from idm_jax.base import Method
from idm_jax.config import Config


class InvalidRun(ValueError):
    """The config or the data cannot make a run; the message names the flag or file to change."""


def _need(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidRun(message)


def check_config(config: Config, image_shape: Optional[Sequence[int]] = None) -> None:
    """Raise ``InvalidRun`` for a config that cannot run (on images of ``image_shape``, H W C).

    Checks the DSA strategies, the two architectures (known, and no BatchNorm in the condensation
    model, whose running statistics the queue does not carry) and, with ``image_shape``, the
    partition geometry that the init, matching and evaluation all use.
    """
    for flag, strategy in (("dsa_strategy", config.dsa_strategy),
                           ("match_dsa_strategy", config.match_dsa_strategy)):
        try:
            augment.parse_strategy(strategy)
        except ValueError as err:
            raise InvalidRun(f"--{flag}: {err}") from None
    for flag, name in (("model", config.model), ("eval_model", config.eval_model)):
        _need(name in models.MODEL_NAMES,
              f"--{flag} {name!r} is not a known architecture; valid: "
              f"{', '.join(models.MODEL_NAMES)}")
    _need(not models.uses_batch_stats(config.model),
          f"--model {config.model!r} uses BatchNorm, whose running statistics the model queue "
          f"does not carry; condense with an instance-norm model such as 'ConvNet' (BatchNorm "
          f"models are fine as --eval_model)")
    if image_shape is None:
        return
    height, width = int(image_shape[0]), int(image_shape[1])
    factor = config.partition_factor
    splits = config.partition_expand and config.partition in ("uniform", "multiscale")
    if splits or config.init.startswith("mosaic"):
        # A factor that does not divide a side is fine (pieces differ by a pixel); one larger
        # than a side would leave empty pieces.
        _need(factor <= min(height, width),
              f"--partition_factor {factor} cuts the {height}x{width} images into pieces of "
              f"less than one pixel (used by "
              f"{'partition-and-expand' if splits else 'the mosaic init'}); choose a factor of "
              f"at most {min(height, width)}")
    if config.partition_expand and config.partition == "nonuniform":
        for size in {height, width}:
            try:
                partition.nonuniform_cuts(size, config.partition_ratio)
            except ValueError as err:
                raise InvalidRun(f"--partition_ratio: {err}") from None


def check_method(config: Config) -> Method:
    """The method ``config.method`` names (``idm_jax.methods``); ``InvalidRun`` if there is
    none (an unknown name, a missing file, a file that fails to load or lacks the name), or if
    it cannot build its image optimiser from the config (an unknown ``image_update``)."""
    try:
        method = methods.get(config.method)
        method.image_optimizer(config, 1)
    except ValueError as err:
        raise InvalidRun(str(err)) from None
    return method


def check_data(config: Config, class_counts: Sequence[int],
               source: str = "the training set") -> None:
    """Raise ``InvalidRun`` when the training set (``class_counts`` images per class) cannot feed
    a run of ``config``; ``source`` names the data in the message. The image shape is checked
    against the config by ``check_config``.
    """
    counts = np.asarray(class_counts)
    _need(counts.size > 0 and counts.sum() > 0, f"{source} holds no training images")
    empty = np.flatnonzero(counts == 0)
    _need(empty.size == 0,
          f"{source}: classes {empty[:10].tolist()} have no training images; every class needs "
          f"real images to match (even with --init noise)")
    if config.init != "noise":    # every init draw takes ipc distinct images of each class
        low = int(np.argmin(counts))
        _need(counts[low] >= config.ipc,
              f"--ipc {config.ipc} with --init {config.init}: class {low} of {source} has only "
              f"{int(counts[low])} training images; lower --ipc or use --init noise")


def check_workdir(workdir: str) -> None:
    """Raise ``InvalidRun`` when ``workdir`` cannot be a run folder: empty, an existing file, a
    path through a file, a name longer than the file system allows, or a folder (or the nearest
    existing one above it, or its checkpoints) that cannot be written (read-only, no
    permission). Checked before any work, so a run never computes to a save that must fail."""
    _need(bool(workdir.strip()), "--workdir is empty; give a folder")
    _need(not os.path.exists(workdir) or os.path.isdir(workdir),
          f"--workdir {workdir} is a file; give a folder")
    existing = os.path.abspath(workdir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    _need(os.path.isdir(existing),
          f"--workdir {workdir}: {existing} is a file, so no folder can be made under it")
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    long = [p for p in os.path.abspath(workdir).split(os.sep) if len(p.encode()) > name_max]
    _need(not long, f"--workdir {workdir}: the name {long[0][:24] if long else ''}... is longer "
                    f"than the {name_max} bytes the file system allows")
    for folder in (existing, os.path.join(workdir, "checkpoints")):
        _need(not os.path.isdir(folder) or os.access(folder, os.W_OK | os.X_OK),
              f"--workdir {workdir}: {folder} cannot be written (read-only or no permission); "
              f"choose another folder or fix its permissions")


def check_devices(requested: int, available: int, hosts: int = 1) -> int:
    """The number of devices a run uses for ``--devices requested`` (0: all ``available``)."""
    _need(requested >= 0, f"--devices must be 0 (all) or a positive count, got {requested}")
    count = requested or available
    _need(count <= available, f"--devices {count} but only {available} are available")
    _need(hosts == 1 or count == available,
          f"with {hosts} hosts the run uses every device of every host ({available}); drop "
          f"--devices {requested}")
    return count


__all__ = ["InvalidRun", "check_config", "check_method", "check_data", "check_workdir",
           "check_devices"]
