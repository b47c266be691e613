"""Condense tinyimagenet with IDM.

`python -m experiments.tinyimagenet --ipc 10 [--FIELD VALUE ...]`
"""

from idm_jax.runs.cli import main

if __name__ == "__main__":
    main("tinyimagenet", default_ipc=10)
