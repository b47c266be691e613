"""A campaign: named experiment commands run one after another, each in its own process.

Every command a campaign runs resumes by itself (a finished run is skipped in seconds, an
interrupted one continues from its checkpoint), so a campaign keeps no state of its own:
running it again continues where it stopped. That is what lets a comparison of a few dozen
hour-long runs be spread over many sessions and still be one recipe.

A campaign is a list of ``Step`` (one command) and ``Later`` (commands decided from the results
of the steps before it, e.g. which rows get a third seed). ``PLANS`` maps a name to a function
building that list from the campaign's folder and data flags; ``register`` adds one, so the
runner is never edited to add a plan. ``run`` runs a list; ``describe`` says what it runs and
what is left of it.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Optional, Sequence, Union

from idm_jax.runs import stop

# The folder holding ``experiments/`` in a source checkout (the steps run
# ``python -m experiments.<name>`` from it); the command line passes the one it was run from.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A closed terminal (SIGHUP) stops a campaign too; its step, in a session of its own, never sees
# the hangup, so it is asked to stop with SIGTERM, which every step saves its place on.
STOPS = (*stop.SIGNALS, *((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ()))


@dataclasses.dataclass(frozen=True)
class Step:
    """One command, ``python -m <module> <argv>``. ``minutes``: about how long it takes from
    scratch on the 2-core CPU machine the project measures on (for the progress line only).
    ``progress``: when given, counts the step's runs from the records already on disk, as
    ``(recorded, expected)``, so a campaign continued on another day says what is left.
    ``needed``: when given and false, the step is left out because every step that reads what
    it makes has all its runs recorded (a pool of networks whose tunings are done, on a new
    machine that lacks the pool)."""
    label: str
    module: str
    argv: tuple[str, ...]
    minutes: float = 0.0
    progress: Optional[Callable[[], tuple[int, int]]] = dataclasses.field(
        default=None, compare=False, repr=False)
    needed: Optional[Callable[[], bool]] = dataclasses.field(
        default=None, compare=False, repr=False)

    def wanted(self) -> bool:
        """False when ``needed`` says nothing left reads what the step makes."""
        return self.needed is None or bool(self.needed())

    def command(self) -> str:
        return " ".join(["python -m", self.module, *map(shlex.quote, self.argv)])


@dataclasses.dataclass(frozen=True)
class Later:
    """Steps that depend on earlier results: ``make()`` is called when the campaign reaches
    this point, never before. ``minutes``: the estimate for all of them, for the progress line.
    ``progress``: as ``Step.progress``, for all of them once they are decided (``(0, 0)``
    before)."""
    label: str
    make: Callable[[], list[Step]]
    minutes: float = 0.0
    progress: Optional[Callable[[], tuple[int, int]]] = dataclasses.field(
        default=None, compare=False, repr=False)


Item = Union[Step, Later]
PLANS: dict[str, Callable[..., list[Item]]] = {}


def register(name: str):
    """Decorator: make a plan builder ``f(workdir, source, data_dir) -> list[Item]`` available
    as ``name``."""
    def add(build):
        PLANS[name] = build
        return build
    return add


class PlanError(Exception):
    """A ``Later`` could not decide its steps (a record it reads is missing or unreadable); the
    message says which file and which step writes it."""


class CampaignStopped(Exception):
    """A step ended with a non-zero status, or the campaign was asked to stop while it ran: the
    campaign stops there (re-running continues). ``status`` is what the campaign exits with."""

    def __init__(self, name: str, step: Step, status: int):
        signum = status - 128 if status > 128 else None
        if signum in [int(s) for s in STOPS]:
            how = f"was stopped by {signal.Signals(signum).name}"
        elif signum in [int(s) for s in signal.Signals]:
            how = (f"was killed by {signal.Signals(signum).name} (out of memory, say); it "
                   f"resumes from its last checkpoint")
        else:
            how = f"failed with status {status} (its own error is printed above)"
        super().__init__(f"step {name} ({step.label}) {how}; re-run the same campaign "
                         f"command to continue from it")
        self.name, self.step, self.status = name, step, status
        self.requested = signum in [int(s) for s in STOPS]


def _counts(item: Item) -> tuple[int, int]:
    """``(recorded, expected)`` runs of ``item`` (``Step.progress``); ``(0, 0)``: cannot tell."""
    return item.progress() if item.progress else (0, 0)


def _left(minutes: float, counts: tuple[int, int]) -> float:
    recorded, expected = counts
    return minutes * max(expected - recorded, 0) / expected if expected > 0 else minutes


def minutes_left(item: Item) -> float:
    """About how long ``item`` still takes: its estimate scaled by the share of its runs not
    yet recorded (``Step.progress``), or the whole estimate where it cannot tell; 0 for a step
    not needed (``Step.needed``)."""
    if isinstance(item, Step) and not item.wanted():
        return 0.0
    return _left(item.minutes, _counts(item))


def _estimate(item: Item, counts: tuple[int, int]) -> str:
    """The bracketed estimate ``describe`` shows: ``done``, ``3 of 12 runs recorded, about
    1.9 h left``, or the time from scratch."""
    recorded, expected = counts
    if expected and recorded >= expected:
        return "done"
    if recorded:
        return (f"{recorded} of {expected} runs recorded, about "
                f"{_hours(_left(item.minutes, counts))} left")
    return _hours(item.minutes)


def describe(items: Sequence[Item], skip: Sequence[int] = ()) -> str:
    """The plan as numbered commands, with each step's estimate (what its run records say is
    left, where it can tell) and the totals of those not in ``skip``. Each step's records are
    read once."""
    lines, left = [], 0.0
    for number, item in enumerate(items, 1):
        if number in skip:
            lines.append(f"{number:>3}. [skipped] {item.label}")
            continue
        if isinstance(item, Step) and not item.wanted():
            lines.append(f"{number:>3}. [not needed: what it makes is read only by finished "
                         f"steps] {item.label}")
            continue
        counts = _counts(item)
        left += _left(item.minutes, counts)
        if isinstance(item, Later):
            decided = "decided" if counts[1] else "decided when the campaign gets there"
            lines.append(f"{number:>3}. [{_estimate(item, counts)}] {item.label} "
                         f"(its commands are {decided})")
        else:
            lines.append(f"{number:>3}. [{_estimate(item, counts)}] {item.label}\n"
                         f"       {item.command()}")
    total = sum(item.minutes for number, item in enumerate(items, 1) if number not in skip)
    left_out = f" ({len([n for n in skip if 1 <= n <= len(items)])} skipped)" if skip else ""
    lines.append(f"{len(items)} steps{left_out}, about {_hours(total)} from scratch on 2 CPU "
                 f"cores, about {_hours(left)} left by the run records found; finished runs "
                 f"are skipped")
    return "\n".join(lines)


def _hours(minutes: float) -> str:
    return f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"


class _Stops:
    """While entered, a stop signal (``STOPS``) is remembered and passed on to the running
    step's process, if any (SIGHUP as SIGTERM); the campaign then stops once that step has
    ended, whatever its status (a step that finishes its run anyway must not be followed by
    another). A signal the campaign was started ignoring (``nohup``, a shell's ``&``) stays
    ignored."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.child: Optional[subprocess.Popen] = None
        self.signalled: Optional[subprocess.Popen] = None    # the child already passed it
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():   # signals reach only it
            self._previous = {s: signal.signal(s, self._handle) for s in STOPS
                              if signal.getsignal(s) is not signal.SIG_IGN}
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        self.pass_on(self.child)

    def pass_on(self, child: Optional[subprocess.Popen]) -> None:
        """Send ``child`` the step's signal for the one received, once."""
        if (self.signum is not None and child is not None and child is not self.signalled
                and child.poll() is None):
            self.signalled = child
            child.send_signal(signal.SIGTERM if self.signum == getattr(signal, "SIGHUP", None)
                              else self.signum)

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def run(items: Sequence[Item], runner: Optional[Callable[[Step], int]] = None,
        log: Callable[[str], None] = print, *, skip: Sequence[int] = (),
        root: str = ROOT) -> None:
    """Run ``items`` in order through ``runner`` (default: a child process per step, from
    ``root``, see ``run_step``), leaving out the items numbered in ``skip`` (from 1, as
    ``describe`` numbers them). Raises ``CampaignStopped`` at the first step that does not end
    with 0, or after the running step when a stop signal came; ``PlanError`` where a ``Later``
    cannot decide."""
    with _Stops() as stops:
        runner = runner or (lambda step: run_step(step, stops, root))
        for number, item in enumerate(items, 1):
            if number in skip:
                log(f"== step {number}/{len(items)}: {item.label}: skipped")
                continue
            try:
                steps = item.make() if isinstance(item, Later) else [item]
            except PlanError as err:
                raise PlanError(f"step {number} ({item.label}) cannot decide its commands: "
                                f"{err}") from None
            if isinstance(item, Later):
                log(f"== step {number}/{len(items)}: {item.label}: "
                    f"{', '.join(s.label for s in steps) or 'nothing to run'}")
            for part, step in enumerate(steps, 1):
                name = f"{number}.{part}" if isinstance(item, Later) else f"{number}"
                if not step.wanted():
                    log(f"== step {name}/{len(items)}: {step.label}: not needed (every step "
                        f"that reads what it makes has its runs recorded)")
                    continue
                left = sum(map(minutes_left, steps[part - 1:])) + sum(
                    minutes_left(i) for n, i in enumerate(items[number:], number + 1)
                    if n not in skip)
                log(f"== {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC step "
                    f"{name}/{len(items)}: {step.label} (about {_hours(step.minutes)} from "
                    f"scratch; the campaign's rest about {_hours(left)})\n   {step.command()}")
                if stops.signum is None:
                    status = runner(step)
                if stops.signum is not None:    # asked to stop: before this step or during it
                    status = 128 + stops.signum
                if status != 0:
                    raise CampaignStopped(name, step, status)


def run_step(step: Step, stops: Optional[_Stops] = None, root: str = ROOT) -> int:
    """Run one step in a child process of its own session (so a terminal's Ctrl-C reaches it
    once, through ``stops``), from ``root``; returns its exit status, 128 + the signal's
    number when a signal killed it, as a shell reports it. On Linux the step also gets SIGTERM
    if the campaign dies without passing a signal on (``kill -9``), so no step outlives it.
    Each of the campaign's streams that is a terminal is relayed (the step's stdout to its
    stdout, stderr to stderr), so a closed terminal silences the step instead of failing its
    next write; a stream going to a file or a pipe the step writes itself."""
    streams = [stream if stream.isatty() else None for stream in (sys.stdout, sys.stderr)]
    pipe = [subprocess.PIPE if stream else None for stream in streams]
    child = subprocess.Popen(
        [*_launcher(os.getpid()), step.module, *step.argv], cwd=root, start_new_session=True,
        stdout=pipe[0], stderr=pipe[1],
        env=dict(os.environ, PYTHONUNBUFFERED="1") if any(streams) else None)
    copiers = [threading.Thread(target=_copy, args=(source, out), daemon=True)
               for source, out in zip((child.stdout, child.stderr), streams) if out]
    for copier in copiers:
        copier.start()
    if stops is not None:
        stops.child = child
        stops.pass_on(child)                 # a signal that came between the start and now
    try:
        status = child.wait()
    finally:
        if stops is not None:
            stops.child = None
    for copier in copiers:
        copier.join(timeout=10)
    return 128 - status if status < 0 else status


def _copy(source, out) -> None:
    """Copy ``source`` (a step's output pipe) to ``out`` as it comes, until the step ends;
    after the first failed write (a closed terminal) keep reading and drop it."""
    target = out.buffer if hasattr(out, "buffer") else None
    while True:
        chunk = os.read(source.fileno(), 65536)
        if not chunk:
            break
        if target is not None:
            try:
                target.write(chunk)
                target.flush()
            except OSError:
                target = None
    source.close()


# Run in the step's own process before it becomes ``python -m <step>``: ask Linux to send it
# SIGTERM when the campaign (argv[1]) dies, then exec the step; the request survives the exec.
# A launcher, not a ``preexec_fn``: the relaying threads make forking into Python unsafe.
_STOP_WITH_PARENT = """import ctypes, os, signal, sys
if signal.getsignal(signal.SIGINT) is signal.default_int_handler:   # a Ctrl-C passed on
    signal.signal(signal.SIGINT, signal.SIG_DFL)    # before the exec ends it, not lost in it
ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))   # 1: PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):     # the campaign died before the request
    os.kill(os.getpid(), signal.SIGTERM)
os.execv(sys.executable, [sys.executable, "-m", *sys.argv[2:]])
"""


def _launcher(parent: int) -> list[str]:
    """The command a step's module name and arguments follow: on Linux a launcher that ties
    the step's life to ``parent`` (the request is tied to the thread that started the child:
    ``run_step`` waits for the step in that same thread, so it holds for the step's whole
    life); elsewhere plain ``python -m``."""
    if not sys.platform.startswith("linux"):
        return [sys.executable, "-m"]
    return [sys.executable, "-c", _STOP_WITH_PARENT, str(parent)]


__all__ = ["Step", "Later", "PLANS", "STOPS", "register", "PlanError", "CampaignStopped",
           "describe", "minutes_left", "run", "run_step"]
