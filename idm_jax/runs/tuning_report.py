"""What a tuning writes for people: ``tuning.md`` (the grid with its validation accuracies and
gradient norms at iteration 0, the choice and its test accuracy), ``tuning.png`` (validation
against the learning rate) and ``tuning.json`` (everything, for ``comparison``), from the summary
``tuning.run_tuning`` or ``tuning.run_carried`` makes."""

from __future__ import annotations

import os

from idm_jax.runs import checkpoint, study


def no_choice(summary: dict) -> bool:
    """Whether a tuning's record is of a grid whose every setting failed (nothing chosen, no
    test seed run); a carried record, with no grid, is not."""
    return bool(summary.get("grid")) and all(row["failed"] for row in summary["grid"])


def markdown(summary: dict) -> str:
    """The grid (validation accuracy and gradient norms at iteration 0) and the chosen row."""
    origin = summary.get("carried_from")
    if origin:
        return _carried_markdown(summary, origin)
    lines = [f"Tuning {summary['method']} on {summary['dataset']} IPC {summary['ipc']}: "
             f"{_count(summary['grid'])} at seed {summary['trial_seed']}, chosen on "
             f"{summary['validation_per_class']} held-out training images per class; the "
             f"choice run at seeds {summary['test_seeds']}.", "",
             "| setting | validation (%) | grad norm at it 0: loss / each term, unweighted |",
             "|---|---|---|"]
    failed = no_choice(summary)
    for row in summary["grid"]:
        setting = setting_text(row["setting"]) + (" (past the edge)" * bool(
            row.get("past_edge")))
        mark = " (chosen)" if row["setting"] == summary["chosen"] and not failed else ""
        score = ("failed (not finite)" if row["failed"] else
                 f"{row['validation']:.2f} +- {row['validation_std']:.2f}"
                 if row["validation"] is not None else "-")
        terms = norms_text(row["grad_norms_it0"] or {}, row.get("terms_off") or ())
        lines.append(f"| {setting}{mark} | {score} | {terms or '-'} |")
    if failed:
        lines += ["", "Every setting failed: no choice, and no test seed run."]
    else:
        lines += ["", f"Chosen: {setting_text(summary['chosen'])}; test accuracy on fresh "
                  f"seeds: {_test_line(summary['test'])}."]
    if summary.get("still_at_edge") and not failed:
        past = sum(1 for row in summary["grid"] if row.get("past_edge"))
        lines.append(f"The choice is still on the grid's edge after {past} points past it: "
                     f"the best setting may lie further.")
    return "\n".join(lines) + "\n"


def terms_off(config: dict) -> list[str]:
    """The terms a run reports but weighs 0 at every iteration, from its config (as
    ``Config.to_dict`` writes it): ``ce`` where the synthetic CE term is off (DM, M3D, NCFM,
    whose calibration is a step of its own), ``mmd`` (the matching distance) in the CE-only
    control."""
    off = []
    if not config.get("syn_ce", True) or config.get("ce_weight", 1.0) == 0:
        off.append("ce")
    if config.get("match_weight", 1.0) == 0:
        off.append("mmd")
    return off


def norms_text(norms: dict, off=()) -> str:
    """``ce 0.389 / loss 20.9 / mmd 20.9``: each term's gradient norm, a term of ``off`` marked
    as not in the loss (its norm is what a weight would scale, not a force on the images)."""
    return " / ".join(f"{k} {v:.3g}" + (" (not in the loss)" if k in off else "")
                      for k, v in sorted(norms.items()) if k != "ce_scale")


def _count(grid: list[dict]) -> str:
    past = sum(1 for row in grid if row.get("past_edge"))
    return f"{len(grid) - past} settings" + (f" and {past} past the grid's edge" if past else "")


def setting_text(point: dict) -> str:
    """A grid point as text: ``lr_img 0.2, ce_weight 0.5``."""
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, (int, float)) else f"{k} unknown"
                     for k, v in point.items())


def _test_line(test: dict) -> str:
    return (f"{test['mean']:.2f} +- {test['std']:.2f} % over {test['models']} models "
            f"(seed means {', '.join(f'{m:.2f}' for m in test['seed_means'])})"
            if test["mean"] is not None else "no finished test run")


def _carried_markdown(summary: dict, origin: dict) -> str:
    return (f"{summary['method']} on {summary['dataset']} IPC {summary['ipc']} at the setting "
            f"its tuning at IPC {origin['ipc']} chose ({origin['workdir']}: {origin['trials']} "
            f"settings{_past(origin)} at seed {summary['trial_seed']}, "
            f"{origin['grid_failed']} failed), "
            f"{setting_text(summary['chosen'])}, with validation "
            f"{study.cell(origin['validation'], origin['validation_std'])} % there on "
            f"{summary['validation_per_class']} "
            f"held-out images per class; no grid at IPC {summary['ipc']}.\n\n"
            f"Test accuracy at IPC {summary['ipc']} on seeds {summary['test_seeds']}: "
            f"{_test_line(summary['test'])}.\n")


def _past(origin: dict) -> str:
    past = (f" and {origin['past_edge']} past the grid's edge"
            if origin.get("past_edge") else "")
    return past + ("; the choice still on the edge" if origin.get("still_at_edge") else "")


def plot(summary: dict, path: str) -> None:
    """A PNG of the grid: validation accuracy (mean +- std over models) against the image
    learning rate (log scale), one line per value of the other setting; failed settings are
    crosses at the bottom, the chosen one is circled."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict = {}
    for row in summary["grid"]:
        other = ", ".join(f"{k} {v:.3g}" for k, v in row["setting"].items() if k != "lr_img")
        lines.setdefault(other, []).append(row)
    fig, ax = plt.subplots(figsize=(5.0, 3.4), dpi=120)
    scored = [r["validation"] for r in summary["grid"] if r["validation"] is not None]
    floor = min(scored, default=0.0) - 2.0
    for label, rows in lines.items():
        ok = [r for r in rows if r["validation"] is not None]
        ax.errorbar([r["setting"]["lr_img"] for r in ok], [r["validation"] for r in ok],
                    yerr=[r["validation_std"] for r in ok], marker="o", capsize=3,
                    label=label or "lr_img alone")
        bad = [r["setting"]["lr_img"] for r in rows if r["validation"] is None]
        ax.plot(bad, [floor] * len(bad), "x", color="red")
    chosen = next((r for r in summary["grid"] if r["setting"] == summary["chosen"]), None)
    if chosen is not None and chosen["validation"] is not None:
        ax.plot(chosen["setting"]["lr_img"], chosen["validation"], "o", markersize=14,
                markerfacecolor="none", color="black", label="chosen")
    ax.set_xscale("log")
    ax.set_xlabel("image learning rate (lr_img)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"{summary['method']} on {summary['dataset']} IPC {summary['ipc']}: grid at seed "
                 f"{summary['trial_seed']} (x: not finite)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(summary: dict, root: str) -> None:
    """``tuning.json``, ``tuning.md`` and the grid's picture ``tuning.png`` in ``root``."""
    os.makedirs(root, exist_ok=True)
    checkpoint.dump_json(os.path.join(root, "tuning.json"), summary)
    checkpoint.write_text(os.path.join(root, "tuning.md"), markdown(summary))
    picture = os.path.join(root, "tuning.png")
    if summary["grid"]:
        plot(summary, picture)
    elif os.path.exists(picture):     # a grid's picture left by an earlier tuning here
        os.remove(picture)


__all__ = ["no_choice", "markdown", "setting_text", "plot", "write"]
