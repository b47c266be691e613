"""Draw where each partition factor starts and where it ends, at IPC 1 and IPC 10.

    PYTHONPATH=. python docs/study/head_start_chart.py   # writes docs/figures/head_start.png

For partition factors 2, 3 and 4: the random-real mosaic that factor starts from (0 iterations:
4, 9 or 16 real images per stored image) beside the same factor after 100 iterations of IDM,
each the mean +- std over every evaluation model of every recorded seed, read from the run
records in ``docs/study/cpu-ipc1`` and ``docs/study/cpu-ipc10``. The gap between a factor's two
bars is what condensing added; the gap between factors' first bars is their head start. A bar
without records is left out and named in the printout.
"""

import glob
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
# factor -> (its mosaic's variant, the condensed variant)
FACTORS = {2: ("random-real", "idm"), 3: ("random-real-pf3", "pf3"),
           4: ("random-real-pf4", "pf4")}
PANELS = (("IPC 1", "cpu-ipc1"), ("IPC 10", "cpu-ipc10"))
LEGEND = {"start": "random-real mosaic (0 iterations)", "end": "after 100 iterations of IDM"}


def accuracies(folder: str, variant: str) -> tuple[list[float], int]:
    """Every evaluation model's test accuracy (%) over the variant's recorded seeds, and the
    number of seeds."""
    paths = sorted(glob.glob(os.path.join(HERE, folder, variant, "seed*", "results.json")))
    values = []
    for path in paths:
        with open(path) as f:
            values += json.load(f)["accuracies"]
    return values, len(paths)


def main() -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(11, 4.2), sharey=True)
    for ax, (title, folder) in zip(axes, PANELS):
        labelled = set()
        for x, (factor, (start, end)) in enumerate(FACTORS.items()):
            bars = []
            for offset, (variant, style) in enumerate(((start, "start"), (end, "end"))):
                values, seeds = accuracies(folder, variant)
                if not values:
                    print(f"{title}: no records of {variant}, left out")
                    continue
                mean, std = float(np.mean(values)), float(np.std(values))
                bars.append(mean)
                ax.bar(x + (offset - 0.5) * 0.38, mean, 0.36, yerr=std, capsize=3,
                       color="#9ecae1" if style == "start" else "#3182bd",
                       hatch="//" if style == "start" else None,
                       label=None if style in labelled else LEGEND[style])
                labelled.add(style)
                gain = f" ({mean - bars[0]:+.1f})" if len(bars) == 2 else ""
                ax.annotate(f"{mean:.1f}{gain}\n{seeds} seed{'s' * (seeds > 1)}",
                            (x + (offset - 0.5) * 0.38, mean + std + 0.5), ha="center",
                            fontsize=7)
                print(f"{title} factor {factor} {style}: {variant} {mean:.2f} +- {std:.2f} "
                      f"({seeds} seeds x {len(values) // seeds} models)")
        ax.set_xticks(range(len(FACTORS)), [f"factor {f}\n({f * f} pieces)" for f in FACTORS])
        ax.set_title(f"CIFAR-10 {title}, CPU protocol")
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylim(0, 65)
    axes[0].set_ylabel("test accuracy (%), mean +- std over seeds x models")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle("Each partition factor's head start (its mosaic) and what condensing adds "
                 "(in brackets: the gain)", fontsize=10)
    fig.tight_layout()
    path = os.path.join(ROOT, "docs", "figures", "head_start.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
