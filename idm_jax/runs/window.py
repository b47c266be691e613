"""Metrics fetched from the device in windows of iterations, so an accelerator runs ahead.

A run loop (``runs.run``, ``runs.grid_run``) adds each step's device metrics to a
``MetricsWindow`` and flushes it every ``log_window`` iterations and before every checkpoint,
evaluation or stop: the flush fetches the window at once (the one wait for the device) and hands
each iteration's host metrics and its share of the window's seconds to the loop's ``write``.
"""

from __future__ import annotations

import time
from typing import Callable

import jax

from idm_jax.config import Config


def log_window(config: Config, platform: str) -> int:
    """How many iterations' metrics are fetched from the device at once: ``log_every``, else 1
    on a CPU (the host waits for each step anyway) and 100 on an accelerator (so it runs
    ahead; a NaN is then caught up to 99 iterations late, before any checkpoint)."""
    if config.log_every > 0:
        return config.log_every
    return 1 if platform == "cpu" else 100


class MetricsWindow:
    """The iterations whose device metrics are not fetched yet.

    ``write(iteration, metrics, seconds)`` receives each one at the flush: the 0-based
    iteration, its host metrics and the seconds per iteration of the window, timed up to the
    end of the fetch (a step returns before the device has done its work).
    """

    def __init__(self, write: Callable[[int, dict, float], None]):
        self.write = write
        self.pending: list = []            # (0-based iteration, device metrics)
        self.started = time.perf_counter()
        self.seconds = 0.0                 # of every iteration flushed so far

    def add(self, iteration: int, metrics) -> None:
        self.pending.append((iteration, metrics))

    def __len__(self) -> int:
        return len(self.pending)

    def flush(self) -> int:
        """Fetch and write the pending iterations; returns how many there were."""
        count = len(self.pending)
        if not count:
            return 0
        fetched = jax.device_get([m for _, m in self.pending])
        seconds = (time.perf_counter() - self.started) / count
        self.seconds += seconds * count
        for (iteration, _), values in zip(self.pending, fetched):
            self.write(iteration, values, seconds)
        self.pending.clear()
        self.started = time.perf_counter()
        return count


__all__ = ["log_window", "MetricsWindow"]
