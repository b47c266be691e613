"""The official evaluation protocol: train fresh networks on a condensed set, test them.

The protocol (docs/FAITHFULNESS.md, "evaluation"): expand the set with partition-and-expand, train a
fresh network for ``epochs + 1`` epochs with SGD (lr 0.01, momentum 0.9, coupled weight decay 5e-4),
multiply the lr by 0.1 and rebuild the optimiser (momentum reset) after epoch ``epochs // 2 + 1``,
batch 256 with a reshuffle every epoch and the last partial batch kept, per-image DSA on every
batch; score the final model on the test set. ``num_models`` networks are trained in one compiled
program (a vmapped axis or one after another, as the backend policy says). BatchNorm models
(ResNet18BN, ...) carry their running statistics and use them at test time; the padded rows of the
last partial batch are masked out of the batch statistics.
"""

from __future__ import annotations

import math
import time
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from idm_jax import augment, classifier, partition
from idm_jax.accel import backend, microbatch
from idm_jax.nn import models


def _batch_plan(num_images: int, batch_size: int) -> tuple[int, int]:
    steps = max(1, math.ceil(num_images / batch_size))
    return steps, steps * batch_size


def lr_phases(epochs: int) -> tuple[int, int]:
    """Epochs trained at the base lr and at lr/10 for the official ``epoch_eval_train``.

    The official loop runs epochs 0..epochs and drops the lr after epoch ``epochs // 2 + 1``:
    (502, 499) for 1000.
    """
    first = min(epochs // 2 + 2, epochs + 1)
    return first, epochs + 1 - first


def train_and_test(key: jax.Array, model, train_x: jax.Array, train_y: jax.Array,
                   test_x: jax.Array, test_y: jax.Array, *, epochs: int = 1000,
                   batch_size: int = 256, lr: float = 0.01, momentum: float = 0.9,
                   weight_decay: float = 5e-4, dsa_strategy: str = augment.DEFAULT_STRATEGY,
                   test_batch: int = 500, chunk: int = 0,
                   augment_images: Callable = augment.dsa, return_variables: bool = False,
                   on_epoch: Optional[Callable[[jax.Array], None]] = None):
    """Train one fresh ``model`` on (train_x, train_y) and return its test accuracy in [0, 1].

    Pure and vmappable over ``key`` (that is how several models train at once).

    Args:
      train_x: (N, H, W, C) float training images (already expanded); train_y: (N,) int labels.
      test_x: (M, H, W, C) float test images, M a multiple of ``test_batch`` after padding with
        labels -1 (``evaluate_synset`` does it); test_y: (M,) ints, -1 for padding.
      epochs: the official ``epoch_eval_train``; epochs 0..epochs run (epochs + 1 in all).
      chunk: > 0 computes each step's gradient over chunks of that many images, skipping the
        chunks of the last partial batch that hold only padding (``idm_jax.accel.microbatch``; same
        values, faster on CPU). Ignored for BatchNorm models, whose statistics need the batch.
      augment_images: DSA, ``(key, images, strategy, siamese=False) -> images``; the engine
        passes its policy's (``backend.Policy.augment``, which loops over keys batched by a
        vmap over models on CPU).
      return_variables: also return the trained ``{"params", "batch_stats"}`` (to inspect).
      on_epoch: a host function called with the number of epochs done (an int32 scalar) about
        ``REPORTS`` times in all (``jax.debug.callback``: values are unchanged; under a vmap
        over models it is called once for all of them). None compiles no callback.
    """
    k_init, k_train = jax.random.split(key)
    variables = model.init(k_init, train_x[:1])
    params, stats = variables["params"], variables.get("batch_stats", {})
    # BatchNorm statistics need the whole batch; per-sample networks may run in chunks.
    chunked = chunk if chunk > 0 and not stats else 0
    epochs_of = _Epochs(train_x, train_y, batch_size, augment_images, dsa_strategy, on_epoch,
                        max(1, (epochs + 1) // REPORTS))
    sgd_step = _sgd_step(_loss(model, bool(stats)), chunked)
    # The second phase starts from a fresh optimiser: the official code rebuilds it (momentum 0).
    first, second = lr_phases(epochs)
    k_first, k_second = jax.random.split(k_train)
    carry = _run_phase(epochs_of, sgd_step, (params, stats), k_first, first,
                       classifier.sgd(lr, momentum, weight_decay), 0, epochs + 1)
    if second > 0:
        carry = _run_phase(epochs_of, sgd_step, carry, k_second, second,
                           classifier.sgd(lr * 0.1, momentum, weight_decay), first, epochs + 1)
    params, stats = carry
    accuracy = test_accuracy(model, params, stats, test_x, test_y, test_batch, chunked)
    if return_variables:
        return accuracy, {"params": params, "batch_stats": stats}
    return accuracy


class _Epochs(NamedTuple):
    """What every training epoch of an evaluation reads: the set, its batch size, its DSA."""

    train_x: jax.Array
    train_y: jax.Array
    batch_size: int
    augment_images: Callable
    dsa_strategy: str
    on_epoch: Optional[Callable] = None    # progress: called with the epochs done
    report_every: int = 1


# How often an evaluation with a progress function reports, per model: often enough for a bar,
# rarely enough that the host callbacks cost nothing on an accelerator.
REPORTS = 100


def _loss(model, has_stats: bool) -> Callable:
    """``(params, stats, x, y, mask, valid_rows=None) -> (loss, stats)``: the mean CE over the
    valid rows (over ``valid_rows`` instead when ``x`` is one chunk of the batch)."""
    def loss_fn(p, s, x, y, mask, valid_rows=None):
        if has_stats:
            (_, logits), updated = model.apply({"params": p, "batch_stats": s}, x, train=True,
                                               mask=mask, mutable=["batch_stats"])
            s = updated["batch_stats"]
        else:
            _, logits = model.apply({"params": p}, x, train=True)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
        weights = mask.astype(jnp.float32)
        return jnp.sum(ce * weights) / (jnp.sum(weights) if valid_rows is None else valid_rows), s
    return loss_fn


def _sgd_step(loss_fn: Callable, chunk: int) -> Callable:
    """``(params, stats, opt_state, x, y, mask, optimizer) -> (params, stats, opt_state)``: one
    step on a batch, whole or (``chunk`` > 0) with its gradient summed over chunks."""
    def step(params, stats, opt_state, x, y, mask, optimizer):
        if not chunk:
            def batch_loss(p, batch):
                return loss_fn(p, stats, *batch)

            params, opt_state, stats = classifier.train_step(
                batch_loss, params, opt_state, (x, y, mask), optimizer)
            return params, stats, opt_state
        valid_rows = jnp.sum(mask.astype(jnp.float32))

        def chunk_loss(p, part):   # this chunk's share of the batch mean
            return loss_fn(p, stats, *part, valid_rows=valid_rows)[0], ()

        params, opt_state, _ = classifier.train_step(
            chunk_loss, params, opt_state, (x, y, mask), optimizer, chunk=chunk, row_valid=mask)
        return params, stats, opt_state
    return step


def _run_phase(data: _Epochs, sgd_step: Callable, carry, phase_key: jax.Array,
               num_epochs: int, optimizer, first_epoch: int = 0, all_epochs: int = 0) -> tuple:
    """``num_epochs`` epochs from a fresh ``optimizer`` state: a reshuffle per epoch, the last
    partial batch padded and masked, DSA on every batch. Returns (params, stats).
    ``first_epoch``, ``all_epochs``: where the phase lies in the training, for ``on_epoch``."""
    params, stats = carry
    n = data.train_x.shape[0]
    steps, padded = _batch_plan(n, data.batch_size)

    def epoch(carry, inputs):
        epoch_key, done = inputs
        k_perm, k_aug = jax.random.split(epoch_key)
        order = jax.random.permutation(k_perm, n)
        order = jnp.concatenate([order, jnp.zeros(padded - n, order.dtype)])
        valid = jnp.arange(padded) < n

        def step(carry, inputs):
            idx, mask, aug_key = inputs
            x = data.augment_images(aug_key, data.train_x[idx], data.dsa_strategy, siamese=False)
            return sgd_step(*carry, x, data.train_y[idx], mask, optimizer), None

        inputs = (order.reshape(steps, data.batch_size), valid.reshape(steps, data.batch_size),
                  jax.random.split(k_aug, steps))
        carry = jax.lax.scan(step, carry, inputs)[0]
        if data.on_epoch is not None:
            jax.lax.cond((done % data.report_every == 0) | (done == all_epochs),
                         lambda: jax.debug.callback(data.on_epoch, done), lambda: None)
        return carry, None

    done = jnp.arange(first_epoch + 1, first_epoch + num_epochs + 1, dtype=jnp.int32)
    (params, stats, _), _ = jax.lax.scan(epoch, (params, stats, optimizer.init(params)),
                                         (jax.random.split(phase_key, num_epochs), done))
    return params, stats


def test_accuracy(model, params, stats, test_x: jax.Array, test_y: jax.Array, test_batch: int,
                  chunk: int = 0) -> jax.Array:
    """The fraction of test images a trained ``model`` classifies right, in [0, 1].

    ``test_x`` (M, H, W, C) in batches of ``test_batch`` (M a multiple of it; padding rows carry
    label -1 and do not count); ``stats`` the BatchNorm statistics ({} for none); ``chunk`` > 0
    runs each batch in chunks of that many images (same values).
    """
    variables = {"params": params, "batch_stats": stats} if stats else {"params": params}

    def test_chunk(correct, test_part):
        x, y = test_part
        if not chunk:
            _, logits = model.apply(variables, x, train=False)
        else:
            _, logits = microbatch.apply_in_chunks(
                lambda c: model.apply(variables, c, train=False), x, chunk)
        return correct + jnp.sum((jnp.argmax(logits, -1) == y) & (y >= 0)), None

    chunks = test_x.shape[0] // test_batch
    correct, _ = jax.lax.scan(
        test_chunk, jnp.int32(0),
        (test_x.reshape((chunks, test_batch) + test_x.shape[1:]),
         test_y.reshape(chunks, test_batch)))
    return correct / jnp.sum(test_y >= 0)


def _padded_test_set(test_images, test_labels, test_batch: int):
    """The test set padded to a multiple of its batch (padding labelled -1, which never counts):
    (test_x, test_y, test_batch)."""
    test_x = jnp.asarray(test_images, jnp.float32)
    test_y = jnp.asarray(test_labels, jnp.int32)
    test_batch = min(test_batch, test_x.shape[0])
    pad = -test_x.shape[0] % test_batch
    test_x = jnp.concatenate([test_x, jnp.zeros((pad,) + test_x.shape[1:], test_x.dtype)])
    test_y = jnp.concatenate([test_y, -jnp.ones(pad, jnp.int32)])
    return test_x, test_y, test_batch


def evaluate_synset(key: jax.Array, images, labels, test_images, test_labels, *,
                    model: str = "ConvNet", num_classes: Optional[int] = None,
                    num_models: int = 5, epochs: int = 1000, batch_size: int = 256,
                    lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4,
                    dsa_strategy: str = augment.DEFAULT_STRATEGY, expand: bool = True,
                    partition_factor: int = 2, partition_scheme: str = "uniform",
                    partition_ratio: float = 0.4, test_batch: int = 500,
                    compute_dtype=jnp.float32, microbatch_size: int = -1,
                    parallel: Optional[bool] = None,
                    policy: Optional[backend.Policy] = None,
                    validation: Optional[tuple] = None,
                    progress: Optional[Callable[[int, int], None]] = None,
                    model_indices: Optional[Sequence[int]] = None) -> dict:
    """Evaluate a condensed set with the official protocol; the library entry point.

    Args:
      key: PRNG key; model ``i`` uses ``split(key, num_models)[i]``.
      images: (N, H, W, C) float condensed images in normalised space, as stored.
      labels: (N,) int labels.
      test_images: (M, H, W, C) float normalised test images; test_labels: (M,) ints.
      model: architecture name (``idm_jax.nn.models.get_model``), e.g. "ConvNet", "ResNet18BN".
      expand: apply partition-and-expand to the set first (IDM's --aug); labels are tiled.
      partition_factor, partition_scheme, partition_ratio: how (``partition.expand``); IDM's is
        the uniform 2 x 2 grid. Use what the set was condensed with (its export records it).
      microbatch_size: the config's ``microbatch`` (-1 automatic: chunks of 16 on CPU).
      parallel: train the models as a vmapped axis (True) or one after another in the same
        program (``lax.map``, False). None: the policy's ``vmap_models``. Same values.
      policy: the backend policy (``idm_jax.accel.backend``); None resolves it from
        ``microbatch_size``. The engine passes its own.
      validation: (images (V, H, W, C) normalised, labels (V,)): held-out training images
        (``data.split_validation``) on which every trained model is also scored.
      progress: a host function ``(model-epochs done, of all)``, called about ``REPORTS`` times
        per model trained one after another, or in all for vmapped models (for a progress
        bar); it changes no value, but a program with a host callback is not kept in JAX's
        persistent compilation cache. An exception it raises turns it off, not the evaluation.
      model_indices: train only these of the ``num_models`` models (indices into
        ``split(key, num_models)``), in that order; each scores what it scores among all (one
        after another on CPU, bit for bit: tested). None: all of them.

    Returns a dict: ``accuracies`` (list of num_models floats, %), ``mean`` and ``std``
    (population std, %), ``seconds`` (wall time including compilation), ``model``; with
    ``validation`` also ``validation``: {``accuracies``, ``mean``, ``std``} of the same models.
    """
    num_classes = _check_inputs(images, labels, test_images, test_labels, num_classes,
                                validation)
    images, labels = _training_set(images, labels, expand and (
        partition_scheme, partition_factor, partition_ratio))
    policy = backend.resolve(microbatch_size) if policy is None else policy
    net = models.get_model(model, num_classes, in_channels=images.shape[-1], dtype=compute_dtype,
                           conv_op=policy.conv_op)
    test = _padded_test_set(test_images, test_labels, test_batch)
    held_out = None if validation is None else _padded_test_set(*validation, test[2])
    together = policy.vmap_models if parallel is None else parallel
    keys = _model_keys(key, num_models, model_indices)
    one = _one_model(net, images, labels, policy, test, held_out, dict(
        epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
        weight_decay=weight_decay, dsa_strategy=dsa_strategy,
        on_epoch=None if progress is None else _ModelEpochs(progress, len(keys), epochs + 1,
                                                            together)))
    return dict(model=model, **_train_and_score(one, keys, together, validation is not None))


def _training_set(images, labels, partition_spec):
    """The set the models train on, as float32 images and int32 labels: the stored set, or
    its partition-and-expand when ``partition_spec`` is (scheme, factor, ratio)."""
    images, labels = jnp.asarray(images, jnp.float32), jnp.asarray(labels, jnp.int32)
    if not partition_spec:
        return images, labels
    scheme, factor, ratio = partition_spec
    return (partition.expand(images, scheme, factor, ratio),
            partition.expand_labels(labels, scheme, factor))


def _train_and_score(one, keys: jax.Array, together: bool, validated: bool) -> dict:
    """Train and score one model per key (vmapped when ``together``, else one after another
    in one program); the test summary, wall ``seconds`` and, if ``validated``, ``validation``."""
    start = time.perf_counter()
    map_models = jax.vmap if together else backend.sequential
    test_acc, val_acc = jax.device_get(jax.jit(map_models(one))(keys))
    result = {**_summary(test_acc), "seconds": time.perf_counter() - start}
    if validated:
        result["validation"] = _summary(val_acc)
    return result


def _model_keys(key: jax.Array, num_models: int, model_indices) -> jax.Array:
    """The keys of the models to train: ``split(key, num_models)``, or its ``model_indices``."""
    keys = jax.random.split(key, num_models)
    if model_indices is None:
        return keys
    if len(model_indices) == 0 or not all(0 <= m < num_models for m in model_indices):
        raise ValueError(f"model_indices {list(model_indices)}: give indices in "
                         f"0..{num_models - 1}")
    return keys[np.asarray(model_indices, np.int32)]


class _ModelEpochs:
    """The host side of ``on_epoch``: epochs done, reported for all models at once (a vmap) or
    for one model after another, as model-epochs done of all, to ``progress``."""

    def __init__(self, progress: Callable[[int, int], None], num_models: int, epochs: int,
                 together: bool):
        self.progress, self.num_models, self.epochs = progress, num_models, epochs
        self.together, self.models_done = together, 0

    def __call__(self, done) -> None:
        if self.progress is None:
            return
        done = int(done)
        total = self.num_models * self.epochs
        value = done * self.num_models if self.together else self.models_done * self.epochs + done
        self.models_done += (not self.together) and done == self.epochs
        try:
            self.progress(min(value, total), total)
        except Exception as err:      # a progress bar must never stop an evaluation
            print(f"progress display off: {err!r}")
            self.progress = None


def _one_model(net, images, labels, policy: backend.Policy, test: tuple,
               held_out: Optional[tuple], training: dict) -> Callable:
    """``key -> (test accuracy, validation accuracy)`` of one fresh ``net`` trained on the set
    (the test accuracy twice without ``held_out``); ``test``, ``held_out``: padded sets."""
    test_x, test_y, test_batch = test

    def one(k):
        accuracy, variables = train_and_test(
            k, net, images, labels, test_x, test_y, test_batch=test_batch, chunk=policy.chunk,
            augment_images=policy.augment, return_variables=True, **training)
        if held_out is None:
            return accuracy, accuracy
        chunk = 0 if variables["batch_stats"] else policy.chunk
        return accuracy, test_accuracy(net, variables["params"], variables["batch_stats"],
                                       *held_out, chunk)
    return one


def _check_inputs(images, labels, test_images, test_labels, num_classes, validation) -> int:
    """ValueError for inputs that would train or score silently wrong; returns num_classes."""
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or labels.shape != images.shape[:1] or not images.shape[0]:
        raise ValueError(f"expected images (N, H, W, C) and labels (N,) with N > 0, got "
                         f"{images.shape} and {labels.shape}")
    if not np.all(np.isfinite(images)):
        raise ValueError("the condensed images hold NaN or infinite values")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    held_out = [("test", test_images, test_labels)]
    if validation is not None:
        held_out.append(("validation", *validation))
    for name, x, y in [("train", images, labels)] + held_out:
        y = np.asarray(y)
        if np.asarray(x).shape[:1] != y.shape or y.ndim != 1:
            raise ValueError(f"{name} images {np.asarray(x).shape} and labels {y.shape} do not "
                             f"match: one label per image")
        if not np.issubdtype(y.dtype, np.integer) and not np.all(y == np.round(y)):
            raise ValueError(f"{name} labels must be whole class numbers, got {y.dtype}")
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} labels lie in [{y.min():.0f}, {y.max():.0f}], outside the "
                             f"{num_classes} classes 0..{num_classes - 1}")
    return num_classes


def _summary(fractions) -> dict:
    """Accuracies in [0, 1] -> {accuracies (%), mean, std (population)}."""
    return percent_summary(100.0 * np.asarray(fractions, np.float64))


def percent_summary(accuracies) -> dict:
    """Accuracies in % -> {accuracies, mean, std (population)}, as an evaluation reports them."""
    accuracies = np.asarray(accuracies, np.float64)
    return {"accuracies": accuracies.tolist(), "mean": float(accuracies.mean()),
            "std": float(accuracies.std())}


evaluate = evaluate_synset   # the library entry point, exported as idm_jax.evaluate

__all__ = ["REPORTS", "percent_summary", "lr_phases", "train_and_test", "test_accuracy",
           "evaluate_synset", "evaluate"]
