"""A run's evaluation, resumable model by model.

A final evaluation trains ``num_eval`` fresh networks for ``epoch_eval_train + 1`` epochs each:
on 2 CPU cores that is up to an hour at IPC 10. Where the policy trains the models one after
another (CPU, one host), each model is its own program call, bit-identical to its turn in the
all-models program (tested), and what it scored goes to ``evaluation.json`` in the work folder
at once. A signal stops the evaluation as it did before (SIGTERM at once; Ctrl-C when the
model in training returns control), losing only that model: calling the run again trains only
the models not yet scored. The record holds the iteration and digests of the images, the test
set, the result-changing settings, the device policy, the JAX and code versions, so no score of
other inputs is reused; it is removed once ``results.json`` holds the evaluation. The reported
``seconds`` sum every model's call over every session (each with its compilation). On a
vmapped policy (accelerators) or with several hosts the models train in one call, as before.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Optional

import jax
import numpy as np

from idm_jax import data, engine, evaluation
from idm_jax.accel import backend
from idm_jax.config import MECHANICS, Config
from idm_jax.runs import checkpoint, outputs

PARTIAL_FILE = "evaluation.json"


def evaluate_images(images, dataset: data.Dataset, config: Config, key, test_x,
                    policy: Optional[backend.Policy] = None,
                    validation: Optional[data.ValidationSplit] = None,
                    progress: Optional[Callable[[int, int], None]] = None,
                    model_indices=None) -> dict:
    """Evaluate stored synthetic ``images`` (K*ipc, H, W, C), normalised, with the config's
    protocol (``evaluation.evaluate_synset``), on the test set and on ``validation``;
    ``progress(model-epochs done, of all)`` as it goes; ``model_indices``: only these models."""
    held_out = None
    if validation is not None:
        held_out = (data.normalize(validation.images, dataset.mean, dataset.std),
                    validation.labels)
    return evaluation.evaluate_synset(
        key, images, engine.synthetic_labels(dataset.num_classes, config.ipc),
        test_x, dataset.test_labels, model=config.eval_model, num_classes=dataset.num_classes,
        num_models=config.num_eval, epochs=config.epoch_eval_train,
        batch_size=config.batch_train, lr=config.lr_net, momentum=config.net_momentum,
        weight_decay=config.net_weight_decay, dsa_strategy=config.dsa_strategy,
        expand=config.partition_expand, partition_factor=config.partition_factor,
        partition_scheme=config.partition, partition_ratio=config.partition_ratio,
        microbatch_size=config.microbatch, policy=policy, validation=held_out,
        progress=progress, model_indices=model_indices)


def _sha256(*arrays) -> str:
    h = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(np.asarray(array))
        h.update(f"{array.dtype.str}{array.shape}".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def fingerprint(images, config: Config, iteration: int, test=(), policy=None) -> dict:
    """What a kept model score must have been computed from: the iteration, the images' and
    the ``test`` arrays' bytes, every setting that changes a result (``config.MECHANICS`` do not
    in principle; the resolved ``policy``, which decides the chunking and so the order of sums,
    is recorded instead), the JAX and code versions."""
    settings = {k: v for k, v in config.to_dict().items() if k not in MECHANICS}
    return {"iteration": int(iteration),
            "images_sha256": _sha256(np.asarray(images, np.float32)),
            "test_sha256": _sha256(*test),
            "settings_sha256": hashlib.sha256(repr(sorted(settings.items())).encode())
            .hexdigest(),
            "policy": repr(policy), "jax_version": jax.__version__,
            "code_version": outputs.code_version()}


def _kept(path: str, mark: dict) -> dict:
    """The models scored so far for this fingerprint: {index: score}; {} for none or a record
    of other images or settings (or an unreadable one, which is then evaluated again)."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict) or any(record.get(k) != v for k, v in mark.items()):
        return {}
    try:
        return {int(i): {"test": float(s["test"]), "seconds": float(s["seconds"]),
                         "validation": s["validation"]}
                for i, s in record.get("models", {}).items()}
    except (TypeError, ValueError, KeyError, AttributeError):
        return {}


def evaluate_resumably(images, dataset: data.Dataset, config: Config, key, test_x, *,
                       iteration: int, workdir: str, policy: backend.Policy,
                       validation: Optional[data.ValidationSplit] = None,
                       progress: Optional[Callable[[int, int], None]] = None,
                       write: bool = True) -> dict:
    """``evaluate_images``'s result, model by model where the policy trains them one after
    another on one host, each score kept in ``<workdir>/evaluation.json`` (``write``: this host
    writes it) and reused by a later call; ``progress`` counts this call's models only."""
    if policy.vmap_models or jax.process_count() > 1:
        return evaluate_images(images, dataset, config, key, test_x, policy, validation,
                               progress)
    path = os.path.join(workdir, PARTIAL_FILE)
    mark = fingerprint(images, config, iteration, (test_x, dataset.test_labels), policy)
    scores = _kept(path, mark)
    left = [i for i in range(config.num_eval) if i not in scores]
    if scores and left:
        print(f"evaluation: {len(scores)} of {config.num_eval} models already scored "
              f"({path}); training the other {len(left)}")
    epochs = config.epoch_eval_train + 1
    for n, i in enumerate(left):
        shown = None if progress is None else (
            lambda done, _, n=n: progress(n * epochs + done, len(left) * epochs))
        result = evaluate_images(images, dataset, config, key, test_x, policy, validation,
                                 shown, model_indices=[i])
        scores[i] = {"test": result["accuracies"][0], "seconds": result["seconds"],
                     "validation": result.get("validation", {}).get("accuracies", [None])[0]}
        if write:
            checkpoint.dump_json(path, dict(mark, models={str(k): v for k, v in
                                                           sorted(scores.items())}))
    return _combined(scores, config, validation is not None)


def _combined(scores: dict, config: Config, held_out: bool) -> dict:
    """The models' scores (%) in model order as ``evaluate_synset`` reports all of them."""
    ordered = [scores[i] for i in range(config.num_eval)]
    result = {"model": config.eval_model,
              **evaluation.percent_summary([s["test"] for s in ordered]),
              "seconds": float(sum(s["seconds"] for s in ordered))}
    if held_out:
        result["validation"] = evaluation.percent_summary([s["validation"] for s in ordered])
    return result


def discard(workdir: str) -> None:
    """Remove the kept scores once ``results.json`` holds the evaluation."""
    for name in (PARTIAL_FILE, PARTIAL_FILE + ".tmp"):
        if os.path.exists(os.path.join(workdir, name)):
            os.remove(os.path.join(workdir, name))


__all__ = ["PARTIAL_FILE", "evaluate_images", "fingerprint", "evaluate_resumably", "discard"]
