"""Tuned methods side by side: each method's chosen setting on its fresh seeds.

``compare(workdir, methods)`` reads what ``experiments.tune`` left in ``<workdir>/<method>``
(``tuning.json`` and the chosen setting's runs in ``chosen/seed<k>``), runs nothing and loads no
data, and writes ``comparison.md``, ``comparison.json`` and ``comparison.png`` into ``workdir``.
Per method: the chosen setting and its validation accuracy at the trial seed (what the choice
saw), its test and validation accuracy over the test seeds (mean +- population std over every
model of every seed, as the study tables), and the minutes one run took to condense and to
evaluate. Rows are ranked by test accuracy; the last column is each row's gap to the first
divided by the larger of the two spreads.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np

from idm_jax import config as config_lib
from idm_jax.runs import grid_run, study, tuning


def _read(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _spread(values) -> tuple[Optional[float], Optional[float]]:
    values = np.asarray(values, np.float64)
    return (float(values.mean()), float(values.std())) if values.size else (None, None)


def _comparable(config: dict) -> dict:
    """A run's settings less its seed and what cannot change its result."""
    return {k: v for k, v in config.items() if k != "seed" and k not in config_lib.MECHANICS}


def method_row(workdir: str, method: str) -> Optional[dict]:
    """The row of one tuned method; ``{"variant", "failed": why}`` when a test seed of its
    choice stopped being finite; None until its tuning and every test seed finished."""
    root = os.path.join(workdir, tuning.folder(method))
    summary = _read(os.path.join(root, "tuning.json"))
    if summary is None or not summary.get("test_seeds"):
        return None
    chosen = summary["chosen"]
    runs = []
    for seed in summary["test_seeds"]:
        directory = os.path.join(root, "chosen", f"seed{seed}")
        results = _read(os.path.join(directory, "results.json"))
        if results is None and os.path.exists(os.path.join(directory, grid_run.FAILED_FILE)):
            return {"variant": method, "failed": f"seed {seed}: "
                    f"{_read(os.path.join(directory, grid_run.FAILED_FILE)).get('failed')}"}
        # A run of another setting (the choice changed since) does not count, nor test seeds
        # run with other settings (a re-run with more iterations half done).
        if (results is None or not results.get("accuracies")
                or any(results.get("config", {}).get(k) != v for k, v in chosen.items())
                or (runs and _comparable(results["config"]) != _comparable(runs[0]["config"]))):
            return None
        runs.append(results)
    trial = next((row for row in summary["grid"] if row["setting"] == chosen), {})
    mean, std = _spread([a for r in runs for a in r["accuracies"]])
    held_mean, held_std = _spread([a for r in runs
                                   for a in r.get("validation", {}).get("accuracies", [])])
    return {"variant": method, "chosen": chosen, "trial_seed": summary["trial_seed"],
            "trial_validation": trial.get("validation"),
            "trial_validation_std": trial.get("validation_std"),
            "grid_failed": sum(1 for row in summary["grid"] if row["failed"]),
            "mean": mean, "std": std, "validation_mean": held_mean,
            "validation_std": held_std, "seeds": len(runs),
            "models": sum(len(r["accuracies"]) for r in runs),
            "seed_means": [float(np.mean(r["accuracies"])) for r in runs],
            "condense_minutes": float(np.mean([r.get("condense_seconds", 0.0) for r in runs])) / 60,
            "eval_minutes": float(np.mean([r.get("eval_seconds", 0.0) for r in runs])) / 60,
            "records": runs}


def _setting(chosen: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in chosen.items())


def _cell(mean: Optional[float], std: Optional[float]) -> str:
    return "-" if mean is None else f"{mean:.2f} +- {std:.2f}"


def markdown(table: list[dict], header: dict) -> str:
    runs = header["runs"]
    lines = [f"Tuned methods on {header['dataset']} IPC {header['ipc']}, tabled "
             f"{header['date']}, commit `{header['commit']}`. Runs made "
             f"{' to '.join(runs['dates'])} on commits "
             f"{', '.join(f'`{c}`' for c in runs['commits'])}, {'; '.join(runs['devices'])}, "
             f"processors: {'; '.join(runs['processors'])}.",
             f"Command: `{header['command']}`", "",
             "| rank | method | chosen setting (grid failures) | validation at the trial seed (%) "
             "| test (%) | validation, test seeds (%) | seeds x models | per-seed means | "
             "condense / eval min per run | gap to first / larger std |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    first = table[0]
    for rank, row in enumerate(table, 1):
        gap = ("" if rank == 1 else
               f"{row['mean'] - first['mean']:+.2f} / {max(row['std'], first['std']):.2f} = "
               f"{(row['mean'] - first['mean']) / max(row['std'], first['std'], 1e-9):.1f}")
        held = _cell(row["validation_mean"], row["validation_std"])
        lines.append(
            f"| {rank} | `{row['variant']}` | {_setting(row['chosen'])} ({row['grid_failed']}) | "
            f"{_cell(row['trial_validation'], row['trial_validation_std'])} | "
            f"**{row['mean']:.2f} +- {row['std']:.2f}** | {held} | "
            f"{row['seeds']} x {row['models'] // row['seeds']} | "
            f"{', '.join(f'{m:.2f}' for m in row['seed_means'])} | "
            f"{row['condense_minutes']:.0f} / {row['eval_minutes']:.1f} | {gap} |")
    if header["failed"]:
        lines += ["", "Failed (not finite) at a test seed of the chosen setting: "
                  + "; ".join(f"{m} ({why})" for m, why in header["failed"].items()) + "."]
    if header["missing"]:
        lines += ["", f"Not finished, so not in the table: {', '.join(header['missing'])}."]
    return "\n".join(lines) + "\n"


def compare(workdir: str, methods: Sequence[str], command: str = "") -> list[dict]:
    """Write the comparison of the tuned ``methods`` in ``workdir``; returns its rows, best
    first. ValueError when none of them has finished its tuning and test seeds."""
    rows = {m: method_row(workdir, m) for m in methods}
    failed = {m: r["failed"] for m, r in rows.items() if r is not None and "failed" in r}
    table = sorted((r for m, r in rows.items() if r is not None and m not in failed),
                   key=lambda r: -r["mean"])
    missing = [m for m, r in rows.items() if r is None]
    if not table:
        raise ValueError(f"no method of {', '.join(methods)} has a finished tuning with its "
                         f"test seeds in {workdir}; run experiments.tune for them first")
    records = {r["variant"]: r.pop("records") for r in table}
    settings = {(r[0].get("dataset"), r[0].get("ipc")) for r in records.values()}
    if len(settings) > 1:
        raise ValueError(f"the tunings in {workdir} are of different datasets or IPCs "
                         f"({sorted(settings, key=str)}); compare one setting at a time")
    dataset, ipc = settings.pop()
    header = dict(study.machine(), dataset=dataset, ipc=ipc, command=command, missing=missing,
                  failed=failed, runs=study.provenance(records))
    with open(os.path.join(workdir, "comparison.md"), "w") as f:
        f.write(markdown(table, header))
    with open(os.path.join(workdir, "comparison.json"), "w") as f:
        json.dump({"header": header, "table": table}, f, indent=2)
    study.bar_chart(table, os.path.join(workdir, "comparison.png"),
                    f"{header['dataset']} IPC {header['ipc']}, each method at the setting chosen "
                    f"on validation: test accuracy on fresh seeds, mean +- std over models")
    return table


__all__ = ["method_row", "markdown", "compare"]
