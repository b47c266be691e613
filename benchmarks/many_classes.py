"""How an IDM iteration grows with the number of classes K (the paper's open question 1).

For every K in ``--classes``, IPC in ``--ipcs`` and device count in ``--devices``, one fresh
process builds random uint8 data of CIFAR shape (``--per_class`` images per class), shards the
class axis over that many devices (simulated on a CPU host with
``--xla_force_host_platform_device_count``), compiles the step and times ``--iters`` iterations.
Each record holds the compile time, the fastest iteration, the process's peak RSS (or the
device's peak memory on an accelerator), and where the memory goes by the model of
``idm_jax.accel.memory``: the real images stored per class, one iteration's real batch (float copies
and embeddings), the activations the synthetic backward pass keeps, the queue; and whether the
run recomputes those activations (``memory.cpu_needs_remat``).

    python -m benchmarks.many_classes --classes 10,100,1000 --ipcs 1,10 --devices 1,2,4 \
        --json many_classes.jsonl

Prints one markdown row per configuration; ``--json`` appends the records.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Optional, Sequence

from benchmarks.common import machine_description, progress

# The child process: one (K, ipc, devices) configuration, printing one JSON line.
CHILD = r"""
import json, resource, sys, time
import jax, numpy as np
from idm_jax import config as config_lib, engine as engine_lib
from idm_jax.accel import memory, sharding
from idm_jax import real as real_lib
from idm_jax import presets
args = json.loads(sys.argv[1])
k, ipc, devices = args["classes"], args["ipc"], args["devices"]
config = config_lib.override(presets.get_preset("cifar10-ipc10"), {
    "ipc": ipc, "batch_real": args["batch_real"], "iterations": 10, "eval_every": 0})
rng = np.random.default_rng(0)
labels = np.repeat(np.arange(k), args["per_class"])
images = rng.integers(0, 256, (labels.size, 32, 32, 3), dtype=np.uint8)
mesh = sharding.make_mesh(devices) if devices > 1 else None
real = real_lib.prepare_real(images, labels, [0.5] * 3, [0.25] * 3, k, mesh=mesh)
del images
engine = engine_lib.make_engine(config, k, real.image_shape, max_per_class=real.max_per_class)
state = engine_lib.init_state(engine, real, 0)
if mesh is not None:
    state = engine_lib.shard_state(state, mesh)
step = engine_lib.make_step(engine, real, mesh=mesh)
start = time.perf_counter()
compiled = step.lower(state, real).compile()
compile_s = time.perf_counter() - start
state, metrics = compiled(state, real)
jax.block_until_ready(metrics)
times = []
for _ in range(args["iters"]):
    start = time.perf_counter()
    state, metrics = compiled(state, real)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
params = jax.eval_shape(engine.init_params, jax.random.PRNGKey(0))
kept = memory.residual_bytes_per_image(engine.apply, params, real.image_shape)
# The real batch: its gathered and augmented float32 copies, and its embeddings.
one = jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32)
dim = jax.eval_shape(engine.apply, params, one)[0].shape[-1]
real_batch = memory.real_batch_bytes(config, k, real.image_shape, real.max_per_class) + (
    k * min(config.batch_real, real.max_per_class) * dim * 4)
stats = jax.devices()[0].memory_stats() or {}
print(json.dumps({
    "classes": k, "ipc": ipc, "devices": devices, "batch_real": config.batch_real,
    "per_class": args["per_class"], "compile_s": compile_s, "iteration_s": min(times),
    "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
    "peak_device_gib": stats.get("peak_bytes_in_use", 0) / 2 ** 30,
    "real_stored_gib": k * real.max_per_class * 32 * 32 * 3 / 2 ** 30,
    "real_batch_gib": real_batch / 2 ** 30,
    "synthetic_kept_gib": k * ipc * config.pieces * kept / 2 ** 30,
    "remat": engine.policy.remat, "chunk": engine.policy.chunk,
    "queue_gib": config.net_num * 2 * memory.tree_bytes(params) / 2 ** 30}))
"""


def run_one(classes: int, ipc: int, devices: int, batch_real: int, per_class: int, iters: int,
            timeout: float) -> dict:
    env = dict(os.environ)
    if devices > 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={devices}").strip()
    args = json.dumps({"classes": classes, "ipc": ipc, "devices": devices,
                       "batch_real": batch_real, "per_class": per_class, "iters": iters})
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, args], env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"classes": classes, "ipc": ipc, "devices": devices, "error": f"over {timeout} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1][:300]
        return {"classes": classes, "ipc": ipc, "devices": devices,
                "error": f"exit {done.returncode}: {last}"}
    record = json.loads(done.stdout.strip().splitlines()[-1])
    record["wall_s"] = time.perf_counter() - start
    return record


def row(r: dict) -> str:
    if "error" in r:
        return f"| {r['classes']} | {r['ipc']} | {r['devices']} | failed: {r['error']} |"
    return (f"| {r['classes']} | {r['ipc']} | {r['devices']} | {r['iteration_s']:.2f} | "
            f"{r['compile_s']:.1f} | {r['peak_rss_gib']:.2f} | {r['real_stored_gib']:.2f} | "
            f"{r['real_batch_gib']:.2f} | {r['synthetic_kept_gib']:.2f} | "
            f"{r['queue_gib']:.2f} | {'yes' if r['remat'] else 'no'} |")


HEADER = ("| K | IPC | devices | iteration s | compile s | peak RSS GiB | real stored GiB | "
          "real batch GiB | synthetic kept GiB | queue GiB | remat |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.many_classes",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", default="10,100,1000")
    parser.add_argument("--ipcs", default="1,10")
    parser.add_argument("--devices", default="1,2,4")
    parser.add_argument("--batch_real", type=int, default=256)
    parser.add_argument("--per_class", type=int, default=300, help="real images per class")
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    ints = lambda text: [int(v) for v in text.split(",") if v]
    records = []
    print(f"machine: {json.dumps(machine_description())}")
    print(HEADER)
    for devices in ints(args.devices):
        for ipc in ints(args.ipcs):
            for classes in ints(args.classes):
                progress(f"K={classes} ipc={ipc} devices={devices}")
                record = run_one(classes, ipc, devices, args.batch_real, args.per_class,
                                 args.iters, args.timeout)
                record["date"] = time.strftime("%Y-%m-%d")
                print(row(record), flush=True)
                records.append(record)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(record) + "\n")
    return records


if __name__ == "__main__":
    main()
