"""Command-line experiments: thin wrappers over the idm_jax library (see experiments/common.py)."""
