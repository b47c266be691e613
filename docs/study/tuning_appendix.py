"""The tuning grids of every method, one after another, for the appendix of RESULTS.md.

Reads ``docs/study/tune-ipc1/<method>/tuning.json`` (runs nothing, reads no data) and writes
``docs/study/tune-ipc1/grids.md``: per method, its grid as ``tuning.md`` tables it (validation
accuracy and gradient norms at iteration 0 per setting, the points past the grid's edge, the
choice and its test accuracy), or a line saying it is not tuned yet. From the repository root:
``PYTHONPATH=. python docs/study/tuning_appendix.py``.
"""

import json
import os

from idm_jax.runs import checkpoint, tuning_report

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tune-ipc1")
METHODS = ("idm", "m3d", "dm", "ncfm", "iid")


def appendix(root: str = ROOT) -> str:
    parts = []
    for method in METHODS:
        path = os.path.join(root, method, "tuning.json")
        if not os.path.exists(path):
            parts.append(f"### {method}\n\nNot tuned yet.\n")
            continue
        with open(path) as f:
            summary = json.load(f)
        parts.append(f"### {method}\n\n{tuning_report.markdown(summary)}")
    return "\n".join(parts)


if __name__ == "__main__":
    text = appendix()
    checkpoint.write_text(os.path.join(ROOT, "grids.md"), text)
    print(text)
