"""Draw the chart of every CPU-protocol variant measured so far, best first.

    PYTHONPATH=. python docs/study/verdict_chart.py   # writes docs/figures/study_cpu_all.png

Groups 3 and 4 come from their run records in ``docs/study/cpu-protocol`` (every seed found).
Groups 1 and 2 ran before records were kept in the repository (their run folders went with their
machine), so their per-model accuracies are copied below from the run tables of ``RESULTS.md``,
which were written from those runs' own ``results.json``.
"""

import glob
import json
import os

from idm_jax.runs import study

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# variant -> per-seed accuracies of the 3 evaluation models (%), from RESULTS.md.
UNRECORDED = {
    "idm": [[40.67, 41.14, 40.21], [40.03, 41.30, 40.14], [42.25, 42.17, 42.98]],
    "random-real": [[20.95, 21.76, 22.83], [18.89, 18.75, 18.70], [23.51, 24.70, 24.52]],
    "dm": [[25.45, 26.08, 26.52], [26.20, 25.01, 26.56], [25.16, 25.00, 26.16]],
    "no-pe": [[23.98, 24.91, 24.55], [26.01, 25.88, 26.08]],
    "no-queue-training": [[36.26, 36.78, 36.79], [34.86, 35.65, 36.11]],
    "no-ce": [[35.79, 35.60, 35.25], [35.42, 36.23, 36.53]],
}


def main() -> None:
    rows = {variant: [{"accuracies": seeds} for seeds in per_seed]
            for variant, per_seed in UNRECORDED.items()}
    records = os.path.join(HERE, "cpu-protocol")
    for variant in study.VARIANTS:
        seeds = sorted(glob.glob(os.path.join(records, variant, "seed*", "results.json")))
        for path in seeds:
            with open(path) as f:
                rows.setdefault(variant, []).append(json.load(f))
    table = sorted(study.aggregate(rows), key=lambda row: -row["mean"])
    path = os.path.join(ROOT, "docs", "figures", "study_cpu_all.png")
    study.bar_chart(table, path, "CIFAR-10 IPC 1, CPU protocol, every variant measured: mean "
                                 "+- std over seeds x models")
    for row in table:
        print(f"{row['variant']:>20} {row['mean']:6.2f} +- {row['std']:.2f} "
              f"({row['seeds']} x {row['models'] // row['seeds']})")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
