"""Record keeping shared by the benchmarks: machine description, load, progress, report.

Imports no JAX itself, so that the PyTorch baseline (``benchmarks.torch_reference``) can run in
an environment with PyTorch only.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from typing import Callable, Optional, Sequence


def machine_description() -> dict:
    """CPU model, core count, memory and the JAX device, for the benchmark record."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = float("nan")
    machine = {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem_gb, 1)}
    if "jax" in sys.modules:   # only a benchmark of JAX code has a JAX device to describe
        import jax
        device = jax.devices()[0]
        machine.update(backend=jax.default_backend(),
                       device=f"{len(jax.devices())} x {device.device_kind}",
                       jax=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""))
    return machine


def load_average() -> Optional[float]:
    """One-minute load average (other processes share the cores: timings are noisy)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def progress(message: str) -> None:
    """A progress line on stderr (full-size CPU runs take minutes per program)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def report(record: dict, module: str, argv: Optional[Sequence[str]], header: str,
           row: Callable[[dict], str], json_path: Optional[str]) -> dict:
    """Stamp ``record`` with date, command and machine; print the table row and the JSON line;
    append the JSON line to ``json_path`` if given. Returns the stamped record."""
    command = f"python -m {module} " + " ".join(argv if argv is not None else sys.argv[1:])
    record = {"date": datetime.date.today().isoformat(), "command": command,
              "machine": machine_description(), **record}
    line = json.dumps(record, default=float)
    print(header)
    print(row(record))
    print(line)
    if json_path:
        with open(json_path, "a") as f:
            f.write(line + "\n")
    return record

