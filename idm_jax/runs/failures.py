"""Failures a user can act on, reported as one line; the libraries' log noise kept off the terminal.

Every command-line entry point runs inside ``user_facing``, the one place that turns a failure
into what the user sees:
- ``UserError`` (a flag, a file or an input the user can correct): one ``error:`` line, exit 2;
- ``stop.Interrupted`` (a signal stopped the run after its checkpoint): the line saying where it
  stopped, exit 128 + the signal's number, the status a scheduler's requeue expects;
- an OS error a user can fix (a full disk, a read-only folder, a missing permission, a name too
  long, a path through a file): one ``error:`` line naming the path and the cause, exit 1.
Anything else, a bug, keeps its traceback. A run's own stop handling (``runs.stop``) has already
saved what it could by then.
"""

from __future__ import annotations

import errno
import functools
import logging
import sys

from idm_jax.runs import stop

# The errors that name something the user can change: the disk, the folder, the name.
ACTIONABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
              errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.EEXIST}

_HINTS = {errno.ENOSPC: "free some space or choose another folder",
          errno.EDQUOT: "free some space or choose another folder",
          errno.EROFS: "the file system is read-only; choose a writable folder",
          errno.EACCES: "choose a folder you can write to",
          errno.EPERM: "choose a folder you can write to",
          errno.ENAMETOOLONG: "choose a shorter name",
          errno.ENOTDIR: "a part of the path is a file, not a folder",
          errno.EISDIR: "the path is a folder; give a file name",
          errno.EEXIST: "something is in the way at that path"}


class UserError(Exception):
    """A problem the user can fix; printed as one ``error:`` line without a traceback."""


def message(err: OSError) -> str:
    """One sentence for an actionable OS error: the path, the cause and what to do."""
    where = err.filename if err.filename is not None else "a file"
    return f"{where}: {err.strerror or err}; {_HINTS.get(err.errno, 'check the path')}"


def actionable(err: BaseException) -> OSError | None:
    """The actionable OS error behind ``err`` (itself or a cause it wraps), else None."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, OSError) and err.errno in ACTIONABLE:
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def user_facing(main):
    """Wrap an entry point: a user's error, a stop and an actionable OS error each end in one
    line and their exit status (module docstring); anything else propagates."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        quiet_libraries()
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except stop.Interrupted as interrupted:
            print(interrupted)
            raise SystemExit(interrupted.exit_status) from None
        except Exception as err:          # noqa: BLE001 - only the actionable kind is caught
            cause = actionable(err)
            if cause is None:
                raise
            print(f"error: {message(cause)}", file=sys.stderr)
            raise SystemExit(1) from None
    return wrapped


def quiet_libraries() -> None:
    """Orbax's and TensorStore's asyncio tracebacks and absl's save-timing warnings are not for
    the user: our own messages say what happened (a damaged checkpoint, a stop)."""
    logging.getLogger("absl").setLevel(logging.ERROR)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


__all__ = ["ACTIONABLE", "message", "actionable", "user_facing", "quiet_libraries"]
