"""Condense cifar100 with IDM: `python -m experiments.cifar100 --ipc 10 [--FIELD VALUE ...]`."""

from idm_jax.runs.cli import main

if __name__ == "__main__":
    main("cifar100", default_ipc=10)
