"""A campaign: named experiment commands run one after another, each in its own process.

Every command a campaign runs resumes by itself (a finished run is skipped in seconds, an
interrupted one continues from its checkpoint), so a campaign keeps no state of its own:
running it again continues where it stopped. That is what lets a comparison of a few dozen
hour-long runs be spread over many sessions and still be one recipe.

A campaign is a list of ``Step`` (one command) and ``Later`` (commands decided from the results
of the steps before it, e.g. which rows get a third seed). ``PLANS`` maps a name to a function
building that list from the campaign's folder and data flags; ``register`` adds one, so the
runner is never edited to add a plan. ``run`` runs a list; ``describe`` prints it.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence, Union

from idm_jax.runs import stop

# The folder holding ``experiments/`` (the steps run ``python -m experiments.<name>`` from it).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class Step:
    """One command, ``python -m <module> <argv>``. ``minutes``: about how long it takes from
    scratch on the 2-core CPU machine the project measures on (for the progress line only)."""
    label: str
    module: str
    argv: tuple[str, ...]
    minutes: float = 0.0

    def command(self) -> str:
        return " ".join(["python -m", self.module, *map(shlex.quote, self.argv)])


@dataclasses.dataclass(frozen=True)
class Later:
    """Steps that depend on earlier results: ``make()`` is called when the campaign reaches
    this point, never before. ``minutes``: the estimate for all of them, for the progress line."""
    label: str
    make: Callable[[], list[Step]]
    minutes: float = 0.0


Item = Union[Step, Later]
PLANS: dict[str, Callable[..., list[Item]]] = {}


def register(name: str):
    """Decorator: make a plan builder ``f(workdir, source, data_dir) -> list[Item]`` available
    as ``name``."""
    def add(build):
        PLANS[name] = build
        return build
    return add


class CampaignStopped(Exception):
    """A step ended with a non-zero status: the campaign stops there (re-running continues)."""

    def __init__(self, number: int, step: Step, status: int):
        if status > 128 and status - 128 in [int(s) for s in stop.SIGNALS]:
            how = f"was stopped by {signal.Signals(status - 128).name}"
        else:
            how = f"failed with status {status} (its own error is printed above)"
        super().__init__(f"step {number} ({step.label}) {how}; re-run the same campaign "
                         f"command to continue from it")
        self.number, self.step, self.status = number, step, status


def describe(items: Sequence[Item]) -> str:
    """The plan as numbered commands, with each step's estimate and the total."""
    lines = []
    for number, item in enumerate(items, 1):
        if isinstance(item, Later):
            lines.append(f"{number:>3}. [{_hours(item.minutes)}] {item.label} "
                         f"(its commands are decided when the campaign gets there)")
        else:
            lines.append(f"{number:>3}. [{_hours(item.minutes)}] {item.label}\n"
                         f"       {item.command()}")
    total = sum(item.minutes for item in items)
    lines.append(f"{len(items)} steps, about {_hours(total)} from scratch on 2 CPU cores; "
                 f"finished runs are skipped")
    return "\n".join(lines)


def _hours(minutes: float) -> str:
    return f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"


def run(items: Sequence[Item], runner: Optional[Callable[[Step], int]] = None,
        log: Callable[[str], None] = print) -> None:
    """Run ``items`` in order through ``runner`` (default: a child process per step, see
    ``run_step``). Raises ``CampaignStopped`` at the first step that does not end with 0."""
    runner = runner or run_step
    for number, item in enumerate(items, 1):
        steps = item.make() if isinstance(item, Later) else [item]
        left = sum(i.minutes for i in items[number - 1:])
        if isinstance(item, Later):
            log(f"== step {number}/{len(items)}: {item.label}: "
                f"{', '.join(s.label for s in steps) or 'nothing to run'}")
        for part, step in enumerate(steps, 1):
            name = f"{number}.{part}" if isinstance(item, Later) else f"{number}"
            log(f"== {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC step "
                f"{name}/{len(items)}: {step.label} (about {_hours(step.minutes)} from scratch; "
                f"the campaign's rest about {_hours(left)})\n   {step.command()}")
            status = runner(step)
            if status != 0:
                raise CampaignStopped(number, step, status)


def run_step(step: Step) -> int:
    """Run one step in a child process of its own session, from ``ROOT``; returns its exit
    status. A stop signal the campaign receives is passed on to the child, which checkpoints
    and exits (a second one aborts it, as for a run alone); the campaign waits for it."""
    child = subprocess.Popen([sys.executable, "-m", step.module, *step.argv], cwd=ROOT,
                             start_new_session=True)   # a terminal's Ctrl-C reaches it once

    def forward(signum, frame):
        child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in stop.SIGNALS}
    try:
        status = child.wait()
        return 128 - status if status < 0 else status    # killed by a signal: as a shell says
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


__all__ = ["Step", "Later", "PLANS", "register", "CampaignStopped", "describe", "run",
           "run_step"]
