"""Test settings shared by every test module.

Tests run on CPU with float32; they must never touch an accelerator or the network. Many tests
build the same programs through different closures; a session-wide persistent compilation cache
lets XLA reuse them instead of recompiling (the largest cost of this suite on 2 cores).
"""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_CACHE = os.environ.setdefault("IDM_JAX_COMPILATION_CACHE",
                               tempfile.mkdtemp(prefix="idm-jax-test-xla-"))

import jax  # noqa: E402  (after the environment is set)

jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
