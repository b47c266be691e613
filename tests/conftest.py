"""Test settings shared by every test module.

Tests run on CPU with float32; they must never touch an accelerator or the network.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
