"""Benchmark of one IDM outer iteration: compile time, iteration time and its split.

The iteration is the jitted ``idm_jax.engine_lib.make_step`` program. Its two parts are timed as
programs of their own:

* matching: the same step built from the config with ``model_train_steps=0`` (extractor forward
  on the real batches of every class, synthetic forward and backward, closed-form image update,
  queue push and meter reset);
* queue training: ``idm_jax.queue.train_slots`` alone (``fetch_net_num`` trainees x
  ``model_train_steps`` SGD steps on ``trained_bs`` real images), jitted with the same model and
  batch sampler as the step.

Throughput is reported against the reference's count of useful FLOPs per iteration (reference
section 9.2: 2.06 TFLOP for CIFAR-10 IPC10), computed from the config, and against the FLOP count
of the compiled program (XLA's cost analysis).

Usage::

    python -m benchmarks.iteration --preset cifar10-ipc10 --data_dir /work/shared/data/cifar10
    python -m benchmarks.iteration --preset cifar10-ipc10 --smoke      # seconds, random data

Prints one table row (markdown) and one JSON line; ``--json FILE`` also appends the JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import load_average, progress, report
from idm_jax.accel import backend
from idm_jax.nn import models
from idm_jax import engine as engine_lib
from idm_jax import real as real_lib
from idm_jax import config as config_lib
from idm_jax import queue as queue_lib
from idm_jax.config import Config
from idm_jax import presets

# Image shapes and class counts when no data directory is given (random uint8 stand-ins).
_SHAPES = {"cifar10": ((32, 32, 3), 10, 5000), "cifar100": ((32, 32, 3), 100, 500),
           "mnist": ((28, 28, 1), 10, 6000), "fashion_mnist": ((28, 28, 1), 10, 6000),
           "svhn": ((32, 32, 3), 10, 7000), "digits": ((16, 16, 1), 10, 120),
           "tinyimagenet": ((64, 64, 3), 200, 500),
           "imagenet_subset": ((224, 224, 3), 100, 1300)}


# ----------------------------------------------------------------------------- environment
def peak_memory() -> dict:
    """Peak device memory when the backend reports it, else the process's max RSS (CPU)."""
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return {"peak_device_gib": stats["peak_bytes_in_use"] / 2**30}
    # ru_maxrss is in KiB on Linux.
    return {"max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


# ----------------------------------------------------------------------------- data
def load_real(config: Config, data_dir: Optional[str], seed: int = 0):
    """The real training set on device: from a NumPy directory, or random uint8 of the right shape.

    Returns (RealData, description of the source).
    """
    if data_dir:
        from idm_jax import data
        dataset = data.load_dataset(config.dataset, source="npy", data_dir=data_dir)
        return (real_lib.prepare_real(dataset.train_images, dataset.train_labels, dataset.mean,
                                      dataset.std, dataset.num_classes),
                f"npy:{data_dir}")
    if config.dataset not in _SHAPES:
        raise ValueError(f"no stand-in shape for dataset {config.dataset!r}; pass --data_dir")
    shape, num_classes, per_class = _SHAPES[config.dataset]
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    images = rng.integers(0, 256, (labels.size,) + shape, dtype=np.uint8)
    channels = shape[-1]
    return (real_lib.prepare_real(images, labels, [0.5] * channels, [0.25] * channels,
                                  num_classes),
            "random-uint8")


# ----------------------------------------------------------------------------- FLOP count
def forward_flops(model_name: str, num_classes: int, image_shape) -> float:
    """Multiply-add FLOPs (2 per MAC) of one forward pass on one image.

    ConvNet family: convolutions and classifier from the architecture (reference 9.1: 0.1015
    GFLOP for ConvNet-3 at 32x32x3); other models: XLA's count for the compiled forward pass.
    """
    model = models.get_model(model_name, num_classes, in_channels=image_shape[-1])
    if isinstance(model, models.ConvNet):
        h, w, c = image_shape
        flops = 0.0
        for d in range(model.depth):
            pad = 3 if (c == 1 and d == 0) else 1
            h, w = h + 2 * pad - 2, w + 2 * pad - 2
            cin = image_shape[-1] if d == 0 else model.width
            flops += 2.0 * h * w * 9 * cin * model.width
            if model.pool != "none":
                h, w = h // 2, w // 2
        return flops + 2.0 * h * w * model.width * num_classes
    variables = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1,) + tuple(image_shape))),
                               jax.random.PRNGKey(0))
    compiled = jax.jit(lambda v, x: model.apply(v, x)).lower(
        variables, jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)).compile()
    return float(_cost(compiled).get("flops", float("nan")))


def iteration_flops(config: Config, num_classes: int, batch_per_class: int,
                    image_shape) -> dict:
    """Useful FLOPs of one iteration as counted by the reference (section 9.2).

    real: forward of every class's real batch; syn: the official code's two forwards plus their
    backward on the expanded synthetic images (6 forward-equivalents); queue: trainees x steps x
    batch forward+backward (3 forward-equivalents). Per ``train_net_num`` extractor.
    """
    f = forward_flops(config.model, num_classes, image_shape)
    real = config.train_net_num * num_classes * batch_per_class * f
    syn = config.train_net_num * num_classes * config.ipc * config.pieces * 6 * f
    queue = config.fetch_net_num * config.model_train_steps * config.trained_bs * 3 * f
    return {"forward_per_image": f, "real": real, "syn": syn, "queue": queue,
            "total": real + syn + queue}


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):   # older JAX returns one dict per device
        cost = cost[0] if cost else {}
    return dict(cost or {})


# ----------------------------------------------------------------------------- timing
def time_calls(call: Callable[[], object], iters: int) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds of ``iters`` calls of ``call`` (each blocks until ready).

    CPU seconds (all threads of this process) are much less sensitive than wall time to other
    processes sharing the cores; on an idle machine wall ~ CPU / threads used.
    """
    wall, cpu = [], []
    for _ in range(iters):
        start, start_cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(call())
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def summary(times: tuple[list[float], list[float]]) -> dict:
    wall, cpu = times
    return {"min": min(wall), "median": statistics.median(wall),
            "all": [round(t, 4) for t in wall], "cpu_min": min(cpu),
            "cpu_median": statistics.median(cpu)}


def profile_ops(call: Callable[[], object], log_dir: str, top: int = 25) -> list[dict]:
    """Run ``call`` once under ``jax.profiler`` and rank the compiled program's ops by time.

    Returns the ``top`` event names with their summed duration (ms, wall time of the executing
    thread: inflated when other processes hold the cores) and count. The raw trace stays in
    ``log_dir`` (TensorBoard / Perfetto).
    """
    import collections
    import glob
    import gzip

    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        jax.block_until_ready(call())
    path = max(glob.glob(os.path.join(log_dir, "plugins", "profile", "*",
                                      "perfetto_trace.json.gz")), key=os.path.getmtime)
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    totals = collections.defaultdict(lambda: [0.0, 0])
    for event in events:
        name = event.get("name", "")
        # Keep XLA's ops; drop Python frames ($...) and the executor's own spans.
        if event.get("ph") != "X" or name.startswith("$") or "::" in name:
            continue
        totals[name][0] += event["dur"] / 1e3
        totals[name][1] += 1
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    return [{"op": name, "ms": round(ms, 1), "count": count} for name, (ms, count) in ranked]


def _compile(jitted, *args):
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    progress(f"  compiled in {time.perf_counter() - start:.1f} s")
    return compiled, time.perf_counter() - start


def bench_step(config: Config, real, iters: int, seed: int = 0,
               profile_dir: Optional[str] = None) -> dict:
    """Compile and time the whole jitted iteration of ``config`` (and profile it if asked)."""
    progress(f"step (model_train_steps={config.model_train_steps}): compiling")
    engine = engine_lib.make_engine(config, real.num_classes, real.image_shape)
    state = engine_lib.init_state(engine, real, seed)
    step = engine_lib.make_step(engine, real)
    compiled, compile_s = _compile(step, state, real)
    holder = {"state": state}

    def call():
        holder["state"], metrics = compiled(holder["state"], real)
        return metrics

    time_calls(call, 1)   # warm-up: first-touch allocations
    times = time_calls(call, iters)
    progress(f"  timed: {', '.join(f'{t:.2f}' for t in times[0])} s")
    metrics = {k: float(v) for k, v in jax.device_get(call()).items()}
    result = {"compile_s": compile_s, "seconds": summary(times),
              "xla_flops": _cost(compiled).get("flops"), "last_metrics": metrics}
    if profile_dir:
        result["profile_top_ops"] = profile_ops(call, profile_dir)
        with open(os.path.join(profile_dir, "step.hlo.txt"), "w") as f:
            f.write(compiled.as_text())
    return result


def bench_queue_training(config: Config, real, iters: int, seed: int = 0,
                         vmap_trainees: Optional[bool] = None) -> dict:
    """Compile and time ``queue.train_slots`` alone, as the step runs it.

    ``vmap_trainees``: None is the step's own (backend-dependent) choice; True/False force
    vmapped or looped trainees.
    """
    map_trainees = (backend.resolve(config.microbatch).map_models if vmap_trainees is None
                    else jax.vmap if vmap_trainees else backend.sequential)
    progress(f"queue training alone (vmap_trainees={vmap_trainees}): compiling")
    engine = engine_lib.make_engine(config, real.num_classes, real.image_shape)
    state = engine_lib.init_state(engine, real, seed)

    def logits_fn(params, images):
        return engine.apply(params, images)[1]

    def train(queue, key, r):
        def trainee_batch(k):
            return real_lib.sample_all_classes(r, k, config.trained_bs, config.normalize_train)

        k_pick, k_train = jax.random.split(key)
        slots, active = queue_lib.sample_slots(queue, k_pick, config.fetch_net_num)
        return queue_lib.train_slots(queue, k_train, slots, active, logits_fn, trainee_batch,
                                     engine.optimizer, config.model_train_steps,
                                     map_trainees=map_trainees, chunk=engine.policy.chunk)

    compiled, compile_s = _compile(jax.jit(train, donate_argnums=0), state.extractors, state.key,
                                   real)
    holder = {"queue": state.extractors, "key": state.key}

    def call():
        holder["key"], key = jax.random.split(holder["key"])
        holder["queue"], acc = compiled(holder["queue"], key, real)
        return acc

    time_calls(call, 1)
    times = time_calls(call, iters)
    progress(f"  timed: {', '.join(f'{t:.2f}' for t in times[0])} s")
    return {"compile_s": compile_s, "seconds": summary(times),
            "xla_flops": _cost(compiled).get("flops")}


# ----------------------------------------------------------------------------- driver
def make_config(preset: str, smoke: bool, overrides: Optional[dict] = None) -> Config:
    config = presets.get_preset(preset)
    if smoke:
        config = presets.smoke(config)
    return config_lib.override(config, overrides or {})


def run(config: Config, real, iters: int, parts: bool = True, seed: int = 0,
        trainees: str = "auto", profile_dir: Optional[str] = None) -> dict:
    """All measurements of one config; returns the record (see ``main`` for the printout)."""
    batch = min(config.batch_real, int(real.per_class.shape[1]))
    flops = iteration_flops(config, real.num_classes, batch, real.image_shape)
    load_before = load_average()
    record = {"full": bench_step(config, real, iters, seed, profile_dir)}
    if parts:
        matching = dataclasses.replace(config, model_train_steps=0)
        record["matching"] = bench_step(matching, real, iters, seed)
        if config.model_train_steps and config.fetch_net_num:
            modes = {"auto": None, "vmap": True, "map": False}
            for mode in (tuple(modes) if trainees == "all" else (trainees,)):
                record[f"queue_{mode}"] = bench_queue_training(
                    config, real, iters, seed, vmap_trainees=modes[mode])
    t = record["full"]["seconds"]["min"]
    record.update(
        flops=flops, iteration_s=t, iterations_per_s=1.0 / t,
        useful_tflops_per_s=flops["total"] / t / 1e12,
        projected_run_hours=(config.iterations + 1) * t / 3600.0,
        load_before=load_before, load_after=load_average(), **peak_memory())
    return record


def table_row(record: dict) -> str:
    full = record["full"]
    part = lambda name: (f"{record[name]['seconds']['min']:.2f}" if name in record else "-")
    return (f"| {record['date']} | {record['preset']}{' (smoke)' if record['smoke'] else ''} "
            f"| {record['data']} | {full['seconds']['min']:.2f} "
            f"(median {full['seconds']['median']:.2f}) | {full['seconds']['cpu_min']:.1f} "
            f"| {part('matching')} | {part('queue_auto')} "
            f"| {part('queue_vmap')} | {part('queue_map')} | {full['compile_s']:.1f} "
            f"| {record['iterations_per_s']:.3f} | {record['useful_tflops_per_s'] * 1e3:.0f} "
            f"| {record['projected_run_hours']:.1f} | {record['load_before']} |")


TABLE_HEADER = ("| date | preset | data | iteration s (min) | iteration CPU s | matching s "
                "| queue s | queue (vmap) s | queue (map) s | compile s | it/s | useful GFLOP/s "
                "| full run h | load |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.iteration",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cifar10-ipc10")
    parser.add_argument("--smoke", action="store_true", help="the preset's seconds-long variant")
    parser.add_argument("--data_dir", default=None,
                        help="NumPy dataset folder (e.g. /work/shared/data/cifar10); "
                             "default: random uint8 images of the dataset's shape")
    parser.add_argument("--iters", type=int, default=3, help="timed calls per program")
    parser.add_argument("--no_parts", action="store_true",
                        help="time the whole iteration only (no matching/queue split)")
    parser.add_argument("--trainees", choices=("auto", "vmap", "map", "all"), default="auto",
                        help="queue-training variant(s) to time alone: the step's own choice "
                             "(auto: lax.map on CPU, vmap elsewhere), vmapped, looped, or all")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="config override, e.g. --set model_train_steps=5 (repeatable)")
    parser.add_argument("--json", default=None, help="also append the JSON record to this file")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="also profile one whole iteration into DIR (jax.profiler trace, "
                             "optimised HLO) and list its most expensive ops")
    args = parser.parse_args(argv)
    if args.iters < 1:
        parser.error("--iters must be >= 1")
    overrides = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set expects FIELD=VALUE, got {item!r}")
        overrides[name] = value
    try:
        config = make_config(args.preset, args.smoke, overrides)
        real, source = load_real(config, args.data_dir)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    record = run(config, real, args.iters, parts=not args.no_parts, trainees=args.trainees,
                 profile_dir=args.profile)
    if "profile_top_ops" in record["full"]:
        print(f"most expensive ops of one iteration (trace in {args.profile}):")
        for row in record["full"]["profile_top_ops"]:
            print(f"  {row['ms']:9.1f} ms  x{row['count']:<5d} {row['op']}")
    record = {"preset": args.preset, "smoke": args.smoke, "data": source,
              "overrides": overrides, **record}
    return report(record, "benchmarks.iteration", argv, TABLE_HEADER, table_row, args.json)


if __name__ == "__main__":
    main()
