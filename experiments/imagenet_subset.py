"""Condense imagenet_subset with IDM.

`python -m experiments.imagenet_subset --ipc 10 [--FIELD VALUE ...]`
"""

from idm_jax.runs.cli import main

if __name__ == "__main__":
    main("imagenet_subset", default_ipc=10)
