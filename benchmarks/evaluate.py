"""Benchmark of the evaluation protocol: time per epoch and per model, parallel vs sequential.

The protocol (``idm_jax.evaluate``, reference section 6) trains ``num_eval`` fresh networks on
the expanded condensed set for ``epochs + 1`` epochs and tests each one. Three ways of running
the same ``num_eval`` models are timed, each as one compiled program:

* parallel: the models as a vmapped axis (what ``evaluate_synset`` runs);
* sequential, one program: ``lax.map`` over the models;
* sequential, one call per model: a one-model program called ``num_eval`` times.

The training set is the size of a CIFAR-style condensed set after partition-and-expand
(``classes x ipc x factor**2`` images; random values: speed does not depend on them). To keep
the measured time about training, the test pass inside the timed programs uses one test batch;
the full test-set pass of one model is timed separately and added to the 1001-epoch projection.
Each program is compiled for 1 epoch and for ``--epochs + 1`` epochs: the time per epoch is the
slope, so fixed costs (initialisation, the test batch) are not counted as training.

Usage::

    python -m benchmarks.evaluate --ipc 10 --epochs 4 --num_eval 5

Prints one table row (markdown) and one JSON line; ``--json FILE`` also appends the JSON line.
"""

from __future__ import annotations

import argparse
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import load_average, progress, report
from benchmarks.iteration import peak_memory, summary, time_calls
from idm_jax import partition
from idm_jax.accel import backend, microbatch
from idm_jax.nn import models
from idm_jax import evaluation as evaluate_lib

FULL_EPOCHS = 1000   # the official epoch_eval_train: epochs 0..1000, 1001 in all


def _compile(fn, *args):
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    progress(f"  compiled in {time.perf_counter() - start:.1f} s")
    return compiled, time.perf_counter() - start


def _time_program(name: str, build, arg, models_run: int, epochs: int, iters: int) -> dict:
    """One program compiled at 1 and ``epochs`` + 1 epochs: its time per epoch (the slope),
    per epoch and model, and its fixed part, in seconds."""
    entry = {}
    for label, epoch_eval_train in (("one_epoch", 0), ("epochs", epochs)):
        progress(f"{name}, {epoch_eval_train + 1} epoch(s): compiling")
        compiled, compile_s = _compile(build(epoch_eval_train), arg)
        jax.block_until_ready(compiled(arg))
        entry[label] = {"compile_s": compile_s,
                        "seconds": summary(time_calls(lambda: compiled(arg), iters))}
    t_one, t_many = entry["one_epoch"]["seconds"]["min"], entry["epochs"]["seconds"]["min"]
    entry["per_epoch_s"] = (t_many - t_one) / epochs
    entry["per_epoch_per_model_s"] = entry["per_epoch_s"] / models_run
    entry["fixed_s"] = t_one - entry["per_epoch_s"]
    return entry


def _time_test_pass(net, rng, image_shape, test_images: int, test_batch: int, chunk,
                    iters: int) -> float:
    """Seconds (min over ``iters``) of the full test pass (the forward of every test image)
    of one trained model, as ``train_and_test`` runs it."""
    variables = models.init_variables(net, jax.random.PRNGKey(0), image_shape)
    full_test = jnp.asarray(rng.normal(size=(test_images,) + tuple(image_shape)), jnp.float32)

    def test_pass(v, x):
        def test_part(correct, xb):
            _, logits = microbatch.apply_in_chunks(lambda c: net.apply(v, c), xb, chunk)
            return correct + jnp.sum(jnp.argmax(logits, -1) == 0), None
        return jax.lax.scan(test_part, jnp.int32(0),
                            x.reshape((-1, test_batch) + x.shape[1:]))[0]

    compiled, _ = _compile(test_pass, variables, full_test)
    jax.block_until_ready(compiled(variables, full_test))
    return summary(time_calls(lambda: compiled(variables, full_test), iters))["min"]


def run(ipc: int = 10, num_classes: int = 10, image_shape=(32, 32, 3), epochs: int = 4,
        num_eval: int = 5, model: str = "ConvNet", batch_size: int = 256, factor: int = 2,
        test_images: int = 10000, iters: int = 2, sequential_calls: bool = True,
        seed: int = 0, microbatch_size: int = -1) -> dict:
    """All measurements; returns the record (seconds are wall, min over ``iters`` calls).

    Every program is compiled twice, for ``epoch_eval_train`` = 0 (one epoch) and ``epochs``
    (epochs + 1), so that the time per epoch is the slope between the two and the fixed part
    (initialisation, one test batch, dispatch) is not spread over the epochs.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1 (the slope needs two epoch counts), got {epochs}")
    rng = np.random.default_rng(seed)
    stored = jnp.asarray(rng.normal(size=(num_classes * ipc,) + tuple(image_shape)), jnp.float32)
    labels = jnp.repeat(jnp.arange(num_classes, dtype=jnp.int32), ipc)
    train_x = partition.partition_expand(stored, factor)
    train_y = partition.partition_expand_labels(labels, factor)
    test_batch = 500
    test_x = jnp.asarray(rng.normal(size=(test_batch,) + tuple(image_shape)), jnp.float32)
    test_y = jnp.asarray(rng.integers(0, num_classes, test_batch), jnp.int32)
    net = models.get_model(model, num_classes, in_channels=image_shape[-1])
    chunk = backend.resolve(microbatch_size).chunk

    def one(key, epoch_eval_train):
        return evaluate_lib.train_and_test(key, net, train_x, train_y, test_x, test_y,
                                           epochs=epoch_eval_train, batch_size=batch_size,
                                           test_batch=test_batch, chunk=chunk)

    keys = jax.random.split(jax.random.PRNGKey(seed), num_eval)
    record = {"train_images": int(train_x.shape[0]), "epochs_run": epochs + 1,
              "steps_per_epoch": evaluate_lib._batch_plan(int(train_x.shape[0]), batch_size)[0],
              "chunk": chunk, "load_before": load_average()}
    programs = {
        "parallel_vmap": (lambda e: jax.vmap(lambda k: one(k, e)), keys, num_eval),
        "sequential_map": (lambda e: lambda ks: jax.lax.map(lambda k: one(k, e), ks), keys,
                           num_eval)}
    if sequential_calls:
        programs["one_model"] = (lambda e: lambda k: one(k, e), keys[0], 1)
    for name, (build, arg, models_run) in programs.items():
        record[name] = _time_program(name, build, arg, models_run, epochs, iters)
    test_s = _time_test_pass(net, rng, image_shape, test_images, test_batch, chunk, iters)
    record["test_pass_s"] = test_s
    for name, runs in (("parallel_vmap", 1), ("sequential_map", 1), ("one_model", num_eval)):
        if name in record:
            e = record[name]
            record[f"projected_1001_epochs_{name}_s"] = runs * (
                e["fixed_s"] + (FULL_EPOCHS + 1) * e["per_epoch_s"] + num_eval / runs * test_s)
    record["load_after"] = load_average()
    record.update(peak_memory())
    return record


TABLE_HEADER = ("| date | ipc | models | parallel (vmap) s/epoch | sequential (map) s/epoch "
                "| one model s/epoch | test pass s | 1001 epochs: parallel min | sequential "
                "(map) min | one model x N min | load |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|")


def table_row(record: dict) -> str:
    one = record.get("one_model", {}).get("per_epoch_s")
    minutes = lambda name: (f"{record[f'projected_1001_epochs_{name}_s'] / 60:.1f}"
                            if f"projected_1001_epochs_{name}_s" in record else "-")
    return (f"| {record['date']} | {record['ipc']} | {record['num_eval']} "
            f"| {record['parallel_vmap']['per_epoch_s']:.2f} "
            f"| {record['sequential_map']['per_epoch_s']:.2f} "
            f"| {'-' if one is None else f'{one:.2f}'} | {record['test_pass_s']:.1f} "
            f"| {minutes('parallel_vmap')} | {minutes('sequential_map')} "
            f"| {minutes('one_model')} | {record['load_before']} |")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.evaluate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=4,
                        help="epoch_eval_train of the longer timed programs (epochs + 1 are "
                             "run; the shorter ones run 1 epoch; >= 1)")
    parser.add_argument("--num_eval", type=int, default=5)
    parser.add_argument("--model", default="ConvNet")
    parser.add_argument("--iters", type=int, default=2, help="timed calls per program")
    parser.add_argument("--test_images", type=int, default=10000,
                        help="test-set size of the projection (a multiple of 500)")
    parser.add_argument("--no_sequential_calls", action="store_true",
                        help="skip the one-model program")
    parser.add_argument("--microbatch", type=int, default=-1,
                        help="images per gradient chunk: -1 automatic (16 on CPU), 0 whole "
                             "batches (the config field of the same name)")
    parser.add_argument("--json", default=None, help="also append the JSON record to this file")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.num_eval < 1 or args.iters < 1 or args.ipc < 1:
        parser.error("need --epochs >= 1, --num_eval >= 1, --iters >= 1, --ipc >= 1")
    if args.test_images < 500 or args.test_images % 500:
        parser.error("--test_images must be a positive multiple of 500")
    record = run(ipc=args.ipc, num_classes=args.num_classes, epochs=args.epochs,
                 num_eval=args.num_eval, model=args.model, iters=args.iters,
                 test_images=args.test_images, sequential_calls=not args.no_sequential_calls,
                 microbatch_size=args.microbatch)
    record = {"ipc": args.ipc, "num_eval": args.num_eval, "model": args.model, **record}
    return report(record, "benchmarks.evaluate", argv, TABLE_HEADER, table_row, args.json)


if __name__ == "__main__":
    main()
