"""Stopping a run on a signal, with a checkpoint.

Ctrl-C (SIGINT), SIGTERM (what SLURM, Kubernetes and most schedulers send on preemption) and
SIGUSR1 (SLURM's ``--signal`` warning) each ask the run loop to finish the iteration, save a
checkpoint and stop; the run then raises ``Interrupted``, and the command lines exit with
128 + the signal's number (130, 143, 138), the status a shell reports for that signal, so a
scheduler's requeue sees a preempted job. A second signal aborts at once.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Optional

SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None))
                if s is not None)


class Interrupted(Exception):
    """The run stopped on a signal after saving a checkpoint; calling again resumes it."""

    def __init__(self, iteration: int, directory: str, signum: int = signal.SIGINT,
                 unit: str = "iteration"):
        name = signal.Signals(signum).name
        super().__init__(f"{name}: stopped at {unit} {iteration}; checkpoint saved in "
                         f"{directory}. Re-run the same command to resume.")
        self.iteration, self.directory, self.signum = iteration, directory, int(signum)

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopRequest:
    """While entered, the first of ``SIGNALS`` sets ``requested`` (and ``signum``); a second
    one restores the previous handlers and aborts (KeyboardInterrupt for Ctrl-C)."""

    def __init__(self):
        self.requested = False
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():   # signals reach only it
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            self._restore()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.requested, self.signum = True, signum
        name = signal.Signals(signum).name
        again = "Ctrl-C" if signum == signal.SIGINT else f"{name}"
        try:
            print(f"\n{name}: saving a checkpoint after this iteration ({again} again to "
                  f"abort)", file=sys.stderr)
        except OSError:         # a closed terminal: the checkpoint matters, the line does not
            pass

    def _restore(self):
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}

    def __exit__(self, *exc):
        self._restore()


__all__ = ["SIGNALS", "Interrupted", "StopRequest"]
