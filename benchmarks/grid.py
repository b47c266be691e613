"""Benchmark of a tuning grid condensed together (``idm_jax.grid``) against its settings run
one by one: compile time, seconds per iteration, peak memory.

The grid's iteration refreshes and trains the extractors once and matches once per setting; a
separate run does all three per setting. Both are timed on the same data, the same budget
(``runs.study.budget_config``: the CPU protocol by default) and the first ``--settings`` points of
the method's tuning grid (``runs.tuning.grid``).

Usage::

    python -m benchmarks.grid --method idm --data_dir ../shared/data/cifar10 --settings 10
    python -m benchmarks.grid --smoke                                 # seconds, digits

Prints one table row (markdown) and one JSON line; ``--json FILE`` also appends the JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import time
from typing import Optional, Sequence

import jax

from benchmarks.common import load_average, progress, report
from idm_jax import data, engine as engine_lib, grid, presets
from idm_jax.runs import study, tuning
from idm_jax import real as real_lib


def _time(step, state, real, iters: int) -> tuple[float, list[float]]:
    """(compile + first call seconds, seconds of each of ``iters`` further calls)."""
    started = time.perf_counter()
    state, metrics = step(state, real)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - started
    times = []
    for _ in range(iters):
        started = time.perf_counter()
        state, metrics = step(state, real)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - started)
    return first, times


def _configs(args) -> list:
    if args.smoke:
        base = dataclasses.replace(presets.smoke(presets.get_preset("digits-ipc1")), syn_ce=True)
    else:
        base = study.budget_config(args.dataset, args.budget, args.ipc, {}, args.method)
    return [dataclasses.replace(base, **point) for point in tuning.grid(base)[:args.settings]]


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.grid", description=__doc__)
    parser.add_argument("--method", default="idm")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--ipc", type=int, default=1)
    parser.add_argument("--budget", default="cpu", choices=study.BUDGETS)
    parser.add_argument("--data_dir", default=None, help="CIFAR-10 .npy folder")
    parser.add_argument("--settings", type=int, default=10, help="grid points (2 to 10)")
    parser.add_argument("--iters", type=int, default=2, help="timed calls per program")
    parser.add_argument("--smoke", action="store_true", help="digits, smoke sizes")
    parser.add_argument("--json", default=None, help="also append the JSON record to this file")
    args = parser.parse_args(argv)
    if not 2 <= args.settings <= tuning.TRIALS:
        parser.error(f"--settings must be 2 to {tuning.TRIALS}, got {args.settings}")
    configs = _configs(args)
    dataset = data.load_dataset("digits" if args.smoke else args.dataset,
                                source=None if args.smoke else "npy", data_dir=args.data_dir)
    real = real_lib.prepare_real(dataset.train_images, dataset.train_labels, dataset.mean,
                                 dataset.std)
    engines = [engine_lib.make_engine(c, real.num_classes, real.image_shape,
                                      max_per_class=real.max_per_class,
                                      normalization=(dataset.mean, dataset.std))
               for c in configs]
    progress(f"one setting alone ({configs[0].method}, lr_img {configs[0].lr_img:g})")
    alone_first, alone = _time(engine_lib.make_step(engines[0], real),
                               engine_lib.init_state(engines[0], real, 0), real, args.iters)
    progress(f"{len(configs)} settings together")
    grid_first, together = _time(grid.make_grid_step(engines, real),
                                 grid.init_grid_state(engines, real, 0), real, args.iters)
    record = {"benchmark": "grid", "method": configs[0].method, "dataset": dataset.name,
              "ipc": configs[0].ipc, "budget": "smoke" if args.smoke else args.budget,
              "settings": len(configs), "batch_real": configs[0].batch_real,
              "alone_iteration_s": statistics.median(alone),
              "alone_compile_s": alone_first - statistics.median(alone),
              "grid_iteration_s": statistics.median(together),
              "grid_compile_s": grid_first - statistics.median(together),
              "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "load_average": load_average()}
    record["speedup"] = len(configs) * record["alone_iteration_s"] / record["grid_iteration_s"]
    return report(
        record, "benchmarks.grid", argv,
        "| method | settings | alone s/it | grid s/it | speed-up (T x alone / grid) | "
        "compile alone / grid s | peak RSS GiB |",
        lambda r: (f"| {r['method']} | {r['settings']} | {r['alone_iteration_s']:.2f} | "
                   f"{r['grid_iteration_s']:.2f} | {r['speedup']:.2f} | "
                   f"{r['alone_compile_s']:.1f} / {r['grid_compile_s']:.1f} | "
                   f"{r['peak_rss_gib']:.2f} |"), args.json)


if __name__ == "__main__":
    main()
