"""The run folder: one process at a time, restarts that keep the old run, a log without repeats.

- ``lock``: an OS file lock on ``<workdir>/.lock`` for as long as a run uses the folder. The
  kernel releases it when the process ends in any way (``kill -9`` included), so a crash never
  leaves a stale lock; a second process gets ``WorkdirBusy`` naming the holder's PID and host.
- ``set_aside``: what ``--restart`` does with the previous run: everything in the folder moves to
  ``<workdir>/previous/<UTC time>/``; nothing is deleted.
- ``trim_metrics``: on resume, drops the log records of iterations after the checkpoint (they are
  run again), so ``metrics.jsonl`` holds each iteration once however the run was interrupted.
- ``record_session``: every start of a run (config, iteration resumed from, host, time) goes to
  ``sessions.jsonl``; ``results.json`` lists them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from typing import Iterator, Optional

LOCK_FILE = ".lock"
PREVIOUS = "previous"
SESSIONS = "sessions.jsonl"
METRICS = "metrics.jsonl"


class WorkdirBusy(RuntimeError):
    """Another live process is running in this workdir."""


def _holder(path: str) -> str:
    try:
        with open(path) as f:
            info = json.load(f)
        return f"PID {info['pid']} on host {info['host']} (since {info['started']})"
    except (OSError, ValueError, KeyError):
        return "another process"


@contextlib.contextmanager
def lock(workdir: str, enabled: bool = True) -> Iterator[None]:
    """Hold the folder's lock for the ``with`` block; raise ``WorkdirBusy`` if it is held.

    ``enabled=False`` (the other hosts of a multi-host run, which share host 0's folder) does
    nothing. Where the OS has no ``fcntl`` (Windows) the folder is not locked.
    """
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if not enabled or fcntl is None:
        yield
        return
    path = os.path.join(workdir, LOCK_FILE)
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise WorkdirBusy(f"--workdir {workdir} is in use by {_holder(path)}; wait for that "
                              f"run to end, or use another --workdir") from None
        handle.seek(0)
        handle.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                   "started": time.strftime("%Y-%m-%d %H:%M:%S")}, handle)
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()   # no stale holder for ``holder`` to report
    finally:
        handle.close()          # closing the file releases the lock


def holder(workdir: str) -> Optional[str]:
    """Who runs in ``workdir`` now ("PID p on host h (since t)"), or None. Reads the lock file
    without taking the lock; a PID on another host is reported as it is recorded."""
    path = os.path.join(workdir, LOCK_FILE)
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    if info.get("host") == socket.gethostname():
        try:
            os.kill(int(info["pid"]), 0)
        except (OSError, ValueError, KeyError):
            return None                      # the recorded process is gone
    return _holder(path)


def set_aside(workdir: str) -> Optional[str]:
    """Move the folder's contents (but the lock and earlier set-aside runs) to
    ``previous/<UTC time>``; returns that path, or None when there was nothing to move."""
    entries = [e for e in os.listdir(workdir) if e not in (LOCK_FILE, PREVIOUS)]
    if not entries:
        return None
    target = os.path.join(workdir, PREVIOUS, time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
    base, n = target, 1
    while os.path.exists(target):
        target, n = f"{base}.{n}", n + 1
    os.makedirs(target)
    for entry in entries:
        shutil.move(os.path.join(workdir, entry), os.path.join(target, entry))
    return target


def trim_metrics(workdir: str, start_iteration: int) -> int:
    """Keep the log records a run resumed at ``start_iteration`` will not write again:
    iterations below it, evaluations at or below it. A torn last line (a kill during a write)
    goes too. Returns the number of lines dropped."""
    path = os.path.join(workdir, METRICS)
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
                it = int(record["iteration"])
            except (ValueError, KeyError, TypeError):
                dropped += 1
                continue
            keep = it <= start_iteration if record.get("event") == "eval" else it < start_iteration
            if keep:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return dropped


def record_session(workdir: str, config_dict: dict, start_iteration: int) -> list[dict]:
    """Append this start of the run to ``sessions.jsonl``; returns every session so far."""
    path = os.path.join(workdir, SESSIONS)
    entry = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "host": socket.gethostname(),
             "pid": os.getpid(), "from_iteration": start_iteration, "config": config_dict}
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
    return read_sessions(workdir)


def read_sessions(workdir: str) -> list[dict]:
    path = os.path.join(workdir, SESSIONS)
    if not os.path.exists(path):
        return []
    sessions = []
    with open(path) as f:
        for line in f:
            try:
                sessions.append(json.loads(line))
            except ValueError:      # a line torn by a kill during the write
                continue
    return sessions


def remove_if_unused(workdir: str) -> bool:
    """Remove a folder a failed run created when it holds nothing but bookkeeping (lock,
    config, sessions, an empty log): a failure before any work leaves no folder behind."""
    bookkeeping = {LOCK_FILE, "config.json", SESSIONS, METRICS, "checkpoints"}
    entries = set(os.listdir(workdir))
    if not entries <= bookkeeping:
        return False
    metrics = os.path.join(workdir, METRICS)
    if METRICS in entries and os.path.getsize(metrics) > 0:
        return False
    checkpoints = os.path.join(workdir, "checkpoints")
    if "checkpoints" in entries and os.listdir(checkpoints):
        return False
    shutil.rmtree(workdir)
    return True


__all__ = ["WorkdirBusy", "lock", "holder", "set_aside", "trim_metrics", "record_session",
           "read_sessions", "remove_if_unused"]
