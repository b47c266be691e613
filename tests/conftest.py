"""Test settings shared by every test module.

Tests run on CPU with float32; they must never touch an accelerator or the network. Many tests
build the same programs through different closures; a session-wide persistent compilation cache
lets XLA reuse them instead of recompiling (the largest cost of this suite on 2 cores), and
the CPU backend compiles without LLVM's optimisations: most tests run a program a few times, so
compiling it costs more than running it (about half the time of the grid test; the same choice
the sharding and multi-host workers made). Runs and benchmarks keep XLA's default.
"""
import atexit
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0").strip()
if "IDM_JAX_COMPILATION_CACHE" not in os.environ:
    os.environ["IDM_JAX_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="idm-jax-test-xla-")
    atexit.register(shutil.rmtree, os.environ["IDM_JAX_COMPILATION_CACHE"], True)
_CACHE = os.environ["IDM_JAX_COMPILATION_CACHE"]
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each pytest-xdist worker (and the runs it starts) keeps its own cache folder, inside the
    # controller's (removed with it): one writer family per folder, as in a serial run.
    _CACHE = os.path.join(_CACHE, os.environ["PYTEST_XDIST_WORKER"])
    os.makedirs(_CACHE, exist_ok=True)
    os.environ["IDM_JAX_COMPILATION_CACHE"] = _CACHE

import jax  # noqa: E402  (after the environment is set)
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# Tests write under tmp_path only. The suite fails when the checkout's ``git status`` (files git
# does not ignore) differs after the run from before it: a test that wrote a record into
# docs/study, say, would otherwise pass and leave the repository changed. (Editing files while
# the suite runs trips it too: the message names the paths.)
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STATUS_BEFORE = pytest.StashKey()


def _repo_status():
    """``git status --porcelain`` of the checkout, untracked files listed one by one; None
    where the tests do not run from a git checkout (or git is missing)."""
    try:
        result = subprocess.run(["git", "-C", _REPO, "status", "--porcelain",
                                 "--untracked-files=all"], capture_output=True, text=True,
                                timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return set(result.stdout.splitlines()) if result.returncode == 0 else None


def pytest_sessionstart(session):
    if not os.environ.get("PYTEST_XDIST_WORKER"):     # the controller only, once per run
        session.config.stash[_STATUS_BEFORE] = _repo_status()


def pytest_sessionfinish(session, exitstatus):
    before = session.config.stash.get(_STATUS_BEFORE, None)
    after = _repo_status() if before is not None else None
    if after is not None and after != before:
        changed = sorted(after ^ before)
        print(f"\nerror: the tests changed the repository (write under tmp_path only): "
              f"{changed}", file=sys.stderr)
        session.exitstatus = 1
