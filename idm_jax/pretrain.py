"""Pools of pretrained networks: trained on the run's own training data, read by a method.

NCFM draws its extractors from networks trained beforehand (each interpolated between its
initial and trained weights) and IID scores its within-class scatter under pretrained
ResNet-18s. Nothing downloads weights: ``train_pool`` trains ``num_models`` networks on a
dataset's training images (after its validation split, so a pool never saw held-out images) and
``save_pool`` / ``load_pool`` keep them in a folder: ``pool.npz`` (the initial and trained
parameters of every network, stacked on a leading axis) and ``pool.json`` (what made them).

Recipes (``RECIPES``) follow the authors' pretraining scripts; the CPU-sized defaults of
``experiments.pretrain`` train fewer networks for fewer epochs (docs/METHODS.md says how much).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from idm_jax import classifier, data
from idm_jax.accel import backend
from idm_jax.nn import models


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a pool's networks are trained (SGD with momentum and coupled weight decay)."""

    model: str
    epochs: int
    batch: int
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[float, ...] = ()   # fractions of the epochs where lr *= gamma
    gamma: float = 0.2
    dsa_strategy: str = ""               # per-image DSA of every batch ("" none)


RECIPES = {
    # NCFM's pretrain_script.py: 60 epochs, batch 128, MultiStepLR at 2/3 and 5/6 (gamma 0.2),
    # DSA colour + crop per image (its CutMix is not reproduced), 20 networks.
    "ncfm": Recipe(model="ConvNet", epochs=60, batch=128, milestones=(2 / 3, 5 / 6),
                   dsa_strategy="color+crop"),
    # IID's pre_model.py: instance-norm ResNet-18, 40 epochs, batch 256, constant lr, no
    # augmentation.
    "iid": Recipe(model="ResNet18", epochs=40, batch=256),
}


def _lr_schedule(recipe: Recipe, steps_per_epoch: int):
    if not recipe.milestones:
        return recipe.lr
    bounds = {int(m * recipe.epochs) * steps_per_epoch: recipe.gamma for m in recipe.milestones}
    return optax.piecewise_constant_schedule(recipe.lr, bounds)


# Compiled blocks per epoch: enough for a progress bar to move every few minutes on a CPU.
PROGRESS_BLOCKS = 20


class PoolProgress(NamedTuple):
    """Where a pretraining stands after a block: ``epoch`` (0-based) and ``step`` (SGD steps
    done in it), the params and optimiser state (leading axis: networks) and ``correct``, each
    network's hits in this epoch so far."""

    epoch: int
    step: int
    params: Any
    opt_state: Any
    correct: jax.Array


def train_pool(dataset: data.Dataset, recipe: Recipe, num_models: int, key: jax.Array,
               validation_per_class: int = 0, validation_seed: int = 0,
               progress: Optional[Callable[[int, int], None]] = None,
               resume: Optional[dict] = None,
               after_block: Optional[Callable[[PoolProgress], None]] = None) -> dict:
    """Train ``num_models`` networks of ``recipe`` on ``dataset``'s training images (minus the
    validation split), all at once (a vmapped axis). Returns ``{"init", "trained"}`` (params
    stacked on a leading axis of ``num_models``) and ``"train_accuracy"`` (%, each network's
    last epoch, on its augmented batches).

    An epoch runs as a few compiled blocks of SGD steps (``PROGRESS_BLOCKS`` per epoch, the
    same steps, keys and order as one scan over the epoch), so ``progress(steps_done,
    steps_total)`` can report within an hour-long epoch on a CPU, and ``after_block`` receives
    the ``PoolProgress`` after each block (to save it; raise from it to stop). ``resume``: the
    arrays ``progress_arrays`` made of such a progress; training continues from there and ends
    bit-identical to an uninterrupted run.
    """
    train, _ = data.split_validation(dataset, validation_per_class, validation_seed)
    x = jnp.asarray(data.normalize(train.train_images, train.mean, train.std))
    y = jnp.asarray(train.train_labels)
    policy = backend.resolve()           # CPU: its convolution, models one after another
    net = models.get_model(recipe.model, train.num_classes, in_channels=x.shape[-1],
                           conv_op=policy.conv_op)
    steps = max(1, x.shape[0] // recipe.batch)
    tx = optax.chain(optax.add_decayed_weights(recipe.weight_decay),
                     optax.sgd(_lr_schedule(recipe, steps), momentum=recipe.momentum))

    run_block, plan = _epoch_programs(net, x, y, recipe, tx, policy, steps)
    k_init, k_train = jax.random.split(key)
    init = jax.vmap(lambda k: net.init(k, x[:1])["params"])(jax.random.split(k_init, num_models))
    at = PoolProgress(0, 0, init, jax.vmap(tx.init)(init), jnp.zeros(num_models, jnp.int32))
    if resume is not None:
        at = _unflatten(resume, at, "progress", "the saved progress")
        at = at._replace(epoch=int(at.epoch), step=int(at.step))
    params, opt_state, correct = at.params, at.opt_state, at.correct
    size = max(1, -(-steps // PROGRESS_BLOCKS))
    for e, epoch_key in enumerate(jax.random.split(k_train, recipe.epochs)):
        if e < at.epoch:
            continue
        rows, keys = plan(jax.random.split(epoch_key, num_models))
        if e > at.epoch:
            correct = jnp.zeros(num_models, jnp.int32)
        for start in range(at.step if e == at.epoch else 0, steps, size):
            params, opt_state, correct = run_block(params, opt_state, correct,
                                                   rows[:, start:start + size],
                                                   keys[:, start:start + size])
            done = min(start + size, steps)
            if progress is not None:
                jax.block_until_ready(correct)      # the bar shows finished steps
                progress(e * steps + done, recipe.epochs * steps)
            if after_block is not None:
                after_block(PoolProgress(e, done, params, opt_state, correct))
    accuracy = 100.0 * correct / (steps * recipe.batch)
    return {"init": init, "trained": params,
            "train_accuracy": np.asarray(accuracy, np.float64).tolist()}


def _epoch_programs(net, x, y, recipe: Recipe, tx, policy, steps: int):
    """The jitted pieces of a pretraining epoch, vmapped or mapped over models: ``run_block``
    (SGD steps over given batches and keys; compiles once per block length, at most 2) and
    ``plan`` (an epoch's batches and per-step keys, as one scan over the epoch would draw)."""
    def loss_fn(params, batch):      # a sum of per-row terms (the batch mean), so it chunks
        images, labels = batch
        _, logits = net.apply({"params": params}, images)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.sum(ce) / recipe.batch, jnp.argmax(logits, -1) == labels

    def block(params, opt_state, correct, rows, keys):
        """SGD steps over ``rows`` (steps, batch) with one augmentation key per step."""
        def step(carry, inputs):
            p, st, hits_so_far = carry
            idx, k = inputs
            images = x[idx]
            if recipe.dsa_strategy:
                images = policy.augment(k, images, recipe.dsa_strategy, siamese=False)
            p, st, hits = classifier.train_step(loss_fn, p, st, (images, y[idx]), tx,
                                                chunk=policy.chunk)
            return (p, st, hits_so_far + jnp.sum(hits)), None

        return jax.lax.scan(step, (params, opt_state, correct), (rows, keys))[0]

    def epoch_plan(epoch_key):
        """The epoch's batches (steps, batch) and per-step keys, as one scan would draw them."""
        k_perm, k_aug = jax.random.split(epoch_key)
        order = jax.random.permutation(k_perm, x.shape[0])[:steps * recipe.batch]
        return order.reshape(steps, recipe.batch), jax.random.split(k_aug, steps)

    return jax.jit(policy.map_models(block)), jax.jit(jax.vmap(epoch_plan))


def _flatten(tree, prefix: str) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {prefix + jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def _unflatten(stored: dict, template: Any, prefix: str, where: str) -> Any:
    """``template``'s tree with its leaves read from ``stored`` (names as ``_flatten`` gives);
    ValueError naming ``where`` when a leaf is missing or shaped otherwise."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for path, leaf in paths:
        name = prefix + jax.tree_util.keystr(path)
        if name not in stored or stored[name].shape != np.shape(leaf):
            raise ValueError(f"{where}: {name} of shape {np.shape(leaf)} is missing; it was made "
                             f"for another network")
        leaves.append(jnp.asarray(stored[name]))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def progress_arrays(at: PoolProgress) -> dict[str, np.ndarray]:
    """``at`` as named host arrays (what ``train_pool(resume=...)`` reads back)."""
    return _flatten(at, "progress")


def save_pool(directory: str, pool: dict, meta: dict) -> None:
    """Write ``pool.npz`` and ``pool.json`` into ``directory`` (each atomically)."""
    os.makedirs(directory, exist_ok=True)
    arrays = {**_flatten(pool["init"], "init"), **_flatten(pool["trained"], "trained")}
    tmp = os.path.join(directory, "pool.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, os.path.join(directory, "pool.npz"))
    record = dict(meta, train_accuracy=pool["train_accuracy"],
                  date=time.strftime("%Y-%m-%d %H:%M:%S"))
    tmp = os.path.join(directory, "pool.json.tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, os.path.join(directory, "pool.json"))


def load_pool(directory: str, template: Any, expect: Optional[dict] = None) -> dict:
    """The pool in ``directory`` as ``{"init", "trained", "meta"}``, its params shaped like
    ``template`` (one network's params) with a leading axis.

    ``expect``: fields of ``pool.json`` that must match (model, dataset, validation split);
    ValueError names the folder and what to do otherwise.
    """
    where = f"--pool_dir {directory}"
    meta_path, arrays_path = (os.path.join(directory, f) for f in ("pool.json", "pool.npz"))
    if not (os.path.isfile(meta_path) and os.path.isfile(arrays_path)):
        raise ValueError(f"{where}: no pretrained pool there (pool.json and pool.npz); make one "
                         f"with python -m experiments.pretrain")
    with open(meta_path) as f:
        meta = json.load(f)
    for field, value in (expect or {}).items():
        if meta.get(field) != value:
            raise ValueError(f"{where}: the pool was made with {field} {meta.get(field)!r}, the "
                             f"run needs {value!r}; pretrain a pool for this run")
    with np.load(arrays_path) as arrays:
        stored = {k: arrays[k] for k in arrays.files}
    count = next(iter(stored.values())).shape[0] if stored else 0
    stacked = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct((count,) + np.shape(leaf),
                                                             np.float32), template)
    return dict({part: _unflatten(stored, stacked, part, f"{where}: pool.npz")
                 for part in ("init", "trained")}, meta=meta)


def load_pool_for(config, template: Any, model: str, method: str = "", recipe: str = "") -> dict:
    """``load_pool(config.pool_dir)`` checked against the run: the pool's network ``model``,
    the dataset, and the validation split (per class and seed) it held out; ValueError naming
    ``--pool_dir`` otherwise (and, with no ``--pool_dir``, how ``method`` gets one: the
    ``recipe`` of ``experiments.pretrain``)."""
    if not config.pool_dir:
        raise ValueError(f"--method {method} needs a pool of pretrained networks: make one with "
                         f"python -m experiments.pretrain --recipe {recipe} and pass --pool_dir")
    pool = load_pool(config.pool_dir, template, {"model": model, "dataset": config.dataset})
    split = pool["meta"].get("validation") or {"per_class": 0, "seed": 0}
    held_out = (split["per_class"], split["seed"] if split["per_class"] else 0)
    wanted = (config.validation_per_class,
              config.validation_seed if config.validation_per_class else 0)
    if held_out != wanted:
        raise ValueError(f"--pool_dir {config.pool_dir}: the pool held out (per class, seed) "
                         f"{held_out} of the training set, the run holds out {wanted}; "
                         f"pretrain with the run's --validation_per_class and seed")
    return pool


__all__ = ["Recipe", "RECIPES", "PoolProgress", "train_pool", "progress_arrays", "save_pool",
           "load_pool", "load_pool_for"]
