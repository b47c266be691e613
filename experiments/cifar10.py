"""Condense cifar10 with IDM: `python -m experiments.cifar10 --ipc 10 [--FIELD VALUE ...]`."""

from idm_jax.runs.cli import main

if __name__ == "__main__":
    main("cifar10", default_ipc=10)
