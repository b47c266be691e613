"""Tuned methods side by side: each method's chosen setting on its fresh seeds.

``compare(workdir, methods)`` reads what ``experiments.tune`` left in ``<workdir>/<method>``
(``tuning.json`` and the chosen setting's runs in ``chosen/seed<k>``), runs nothing and loads no
data, and writes ``comparison.md``, ``comparison.json`` and ``comparison.png`` into ``workdir``
(left as they are when only their stamp, the date, commit and machine, would change).
Per method: the chosen setting and its validation accuracy at the trial seed (what the choice
saw), its test and validation accuracy over the test seeds (mean +- population std over every
model of every seed, as the study tables), and the minutes one run took to condense and to
evaluate. Rows are ranked by test accuracy; the last column is each row's gap to the first
divided by the larger of the two spreads.

``baselines`` adds study variants (``<study workdir>/<variant>/seed<k>``) as untuned rows; every
row must share the protocol (``check_protocol``). A method whose choice was carried from a
tuning at another IPC (``tuning.run_carried``) shows the validation that choice saw there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Optional, Sequence

import numpy as np

from idm_jax.config import Config
from idm_jax.runs import grid_run, study, tuning, tuning_report


def _read(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _test_run(directory: str, seed: int, chosen: dict, first: Optional[Config]):
    """Test seed ``seed``'s ``results.json`` if it ran ``chosen`` at that seed (and, after the
    first seed, the first seed's settings but its seed: ``study.finished``); its
    ``failed.json`` record if that run stopped being finite; else None (a record copied in
    from another seed's folder does not count twice)."""
    failure = _read(os.path.join(directory, grid_run.FAILED_FILE))
    results = _read(os.path.join(directory, "results.json"))
    for record, key in ((results, "results"), (failure, "failed")):
        config = (record or {}).get("config", {})
        if (record is None or config.get("seed") != seed
                or any(config.get(k) != v for k, v in chosen.items())):
            continue
        if key == "failed":
            return {"failed": record.get("failed")}
        if first is None or study.finished(directory, dataclasses.replace(
                first, seed=seed)) is not None:
            return record if record.get("accuracies") else None
    return None


def method_row(workdir: str, method: str) -> Optional[dict]:
    """The row of one tuned method; ``{"variant", "failed": why}`` when every setting of its
    grid or a test seed of its choice stopped being finite; ``{"variant", "stale": why}`` when
    it carried a choice its tuning no longer makes; None until its tuning and every test seed
    finished."""
    root = os.path.join(workdir, tuning.folder(method))
    summary = _read(os.path.join(root, "tuning.json"))
    if summary is None or not summary.get("test_seeds"):
        return None
    if tuning.no_choice(summary):
        return {"variant": method, "failed": "every setting of its grid failed"}
    chosen, runs, first = summary["chosen"], [], None
    for seed in summary["test_seeds"]:
        # A run of another setting (the choice changed since) does not count, nor test seeds
        # run with other settings (a re-run with more iterations half done).
        results = _test_run(os.path.join(root, "chosen", f"seed{seed}"), seed, chosen, first)
        if results is None:
            return None
        if "failed" in results:
            return {"variant": method, "failed": f"seed {seed}: {results['failed']}"}
        runs.append(results)
        first = first or Config.from_dict(results["config"])
    # A choice carried from another IPC shows the validation that choice saw there.
    origin = summary.get("carried_from")
    if origin:
        moved = _carried_choice_moved(workdir, method, summary)
        if moved:
            return {"variant": method, "stale": moved}
    trial = origin or next((row for row in summary["grid"] if row["setting"] == chosen), {})
    edge = origin or tuning.edge_state(summary)
    return dict(study.stats(runs), variant=method, chosen=chosen,
                trial_seed=summary["trial_seed"], trial_validation=trial.get("validation"),
                trial_validation_std=trial.get("validation_std"),
                chosen_at_ipc=origin["ipc"] if origin else summary["ipc"],
                grid_failed=(origin["grid_failed"] if origin else
                             sum(1 for row in summary["grid"] if row["failed"])),
                trials=edge.get("trials"), past_edge=edge.get("past_edge", 0),
                still_at_edge=edge.get("still_at_edge"),
                ipc=summary["ipc"], **_minutes(runs), records=runs)


# A tuning's record fields that make it another tuning when they change, in words.
RERUN_FIELDS = {"validation_per_class": "validation split", "budget": "budget",
                "trial_seed": "trial seed", "overrides": "--set overrides"}


def _carried_choice_moved(workdir: str, method: str, summary: dict) -> str:
    """Why a carried choice is no longer its tuning's choice ('' when it still is, or when
    that tuning is not here to ask). The tuning is looked for beside ``workdir`` first (records
    copied together keep their folder names), then where it was when the choice was carried.
    A grid of the same method and data at the IPC the choice came from is that tuning if it
    also shares the split, budget, trial seed and ``--set`` overrides (where both recorded
    them); one that differs in those was re-run since, so the carry is out of date too."""
    origin, chosen = summary["carried_from"], summary["chosen"]
    name = os.path.basename(os.path.normpath(origin["workdir"]))
    rerun = ""
    for source in (os.path.join(os.path.dirname(os.path.abspath(workdir)), name),
                   origin["workdir"]):
        now = _read(os.path.join(source, tuning.folder(method), "tuning.json"))
        if now is None or now.get("carried_from") or any(
                now.get(k) != v for k, v in (("method", summary.get("method")),
                                             ("dataset", summary.get("dataset")),
                                             ("ipc", origin["ipc"]))):
            continue
        differ = [words for k, words in RERUN_FIELDS.items()
                  if k in now and k in summary and now[k] != summary[k]]
        if differ:
            rerun = rerun or (f"the tuning in {source} was re-run since (its "
                              f"{', '.join(differ)} differ); carry it again")
        elif tuning.no_choice(now):
            return f"the tuning in {source} now fails at every setting; nothing to carry"
        elif now.get("chosen") != chosen:
            return (f"carried {tuning_report.setting_text(chosen)}, but the tuning in "
                    f"{source} now chooses {tuning_report.setting_text(now['chosen'])}; "
                    f"carry it again")
        else:
            return ""
    return rerun


# What every row of one table shares: the data, the budget and the evaluation; the condensing
# rows (iterations > 0) also share their length and real batch. The validation split may differ
# (a baseline run before splits existed condensed from all training images): the table says so.
SHARED = ("dataset", "ipc", "num_eval", "epoch_eval_train", "eval_model", "batch_train",
          "lr_net", "net_momentum", "net_weight_decay", "dsa_strategy")
SHARED_CONDENSING = ("iterations", "batch_real")
SHARED_SPLIT = ("validation_per_class", "validation_seed")


TUNED, UNTUNED = "#4c72b0", "#9a9a9a"       # the chart's colours


def baseline_row(workdir: str, variant: str) -> Optional[dict]:
    """The row of a study variant (``<workdir>/<variant>/seed<k>``, every finished seed there,
    in seed order; other folders are not runs), untuned, beside the tuned methods; None when
    no seed has finished. ValueError when a record is of another seed than its folder or its
    seeds ran other settings than each other."""
    root = os.path.join(workdir, variant)
    seeds = sorted(int(m.group(1)) for m in map(re.compile(r"seed(\d+)").fullmatch,
                                                os.listdir(root) if os.path.isdir(root) else [])
                   if m)
    found = {seed: _read(os.path.join(root, f"seed{seed}", "results.json")) for seed in seeds}
    found = {seed: r for seed, r in found.items() if r and r.get("accuracies")}
    if not found:
        return None
    first = Config.from_dict(next(iter(found.values()))["config"])
    for seed in found:
        if study.finished(os.path.join(root, f"seed{seed}"),
                          dataclasses.replace(first, seed=seed)) is None:
            raise ValueError(f"--baselines {workdir}:{variant}: the run in seed{seed} is not "
                             f"seed {seed} at the settings of seed {first.seed}; move it away")
    runs = list(found.values())
    return dict(study.stats(runs), variant=f"{variant} (study)", study_variant=variant,
                chosen=None, trial_seed=None,
                trial_validation=None, trial_validation_std=None, chosen_at_ipc=None,
                grid_failed=0, **_minutes(runs), records=runs)


def _minutes(runs: list[dict]) -> dict:
    return {"condense_minutes": float(np.mean([study.condense_seconds(r) for r in runs])) / 60,
            "eval_minutes": float(np.mean([r.get("eval_seconds", 0.0) for r in runs])) / 60}


def check_protocol(records: dict[str, list[dict]]) -> dict[str, int]:
    """Refuse rows run under different protocols (``SHARED``, ``SHARED_CONDENSING`` among the
    rows that condense, ``SHARED_SPLIT`` among the rows that hold out a validation split, so
    that their validation columns score the same images); returns each row's held-out images
    per class."""
    configs = {row: Config.from_dict(runs[0]["config"]) for row, runs in records.items()}
    condensing = {row: c for row, c in configs.items() if c.iterations > 0}
    split = {row: c for row, c in configs.items() if c.validation_per_class > 0}
    for fields, group in ((SHARED, configs), (SHARED_CONDENSING, condensing),
                          (SHARED_SPLIT, split)):
        for field in fields:
            values = {row: getattr(c, field) for row, c in group.items()}
            if len(set(values.values())) > 1:
                raise ValueError(f"the rows differ in {field} ({values}); compare one protocol "
                                 f"at a time")
    return {row: c.validation_per_class for row, c in configs.items()}


def _setting(row: dict, split: int) -> str:
    held = f"{split} held out per class" if split else "no split: all training images"
    if row["chosen"] is None:
        return f"untuned: {study.VARIANTS[row['study_variant']][0]} ({held})"
    at = ("" if row["chosen_at_ipc"] == row.get("ipc") else
          f" (chosen at IPC {row['chosen_at_ipc']})")
    return tuning_report.setting_text(row["chosen"]) + f"{at} ({_trials(row)})"


def _trials(row: dict) -> str:
    """``10 + 2 past the edge, 1 failed; still on the edge``: the grid the choice came from."""
    if row.get("trials") is None:          # a record from before trials were counted
        return f"{row['grid_failed']} failed"
    past = f" + {row['past_edge']} past the edge" if row.get("past_edge") else ""
    edge = "; still on the edge" if row.get("still_at_edge") else ""
    return f"{row['trials']}{past}, {row['grid_failed']} failed{edge}"


def markdown(table: list[dict], header: dict) -> str:
    runs = header["runs"]
    lines = [f"Tuned methods on {header['dataset']} IPC {header['ipc']}, tabled "
             f"{header['date']}, commit `{header['commit']}`. {study.runs_line(runs)}",
             f"Command: `{header['command']}`", "",
             "A `(study)` row is a study variant at its own settings, tuned on nothing; a "
             "setting chosen at another IPC shows the validation its choice saw there.", "",
             "| rank | method | chosen setting (grid points, failures) | validation at the trial "
             "seed (%) | test (%) | validation, test seeds (%) | seeds x models | per-seed means | "
             "condense / eval min per run | gap to first / larger std |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    first = table[0]
    for rank, row in enumerate(table, 1):
        # A one-seed row's spread is its models' only, smaller than the seeds' (RESULTS.md).
        gap = ("" if rank == 1 else
               f"{row['mean'] - first['mean']:+.2f} / {max(row['std'], first['std']):.2f} = "
               f"{(row['mean'] - first['mean']) / max(row['std'], first['std'], 1e-9):.1f}"
               + (" (a 1-seed row)" if min(row["seeds"], first["seeds"]) == 1 else ""))
        held = study.cell(row["validation_mean"], row["validation_std"])
        lines.append(
            f"| {rank} | `{row['variant']}` | {_setting(row, header['splits'][row['variant']])} | "
            f"{study.cell(row['trial_validation'], row['trial_validation_std'])} | "
            f"**{row['mean']:.2f} +- {row['std']:.2f}** | {held} | "
            f"{row['seeds']} x {row['models'] // row['seeds']} | "
            f"{', '.join(f'{m:.2f}' for m in row['seed_means'])} | "
            f"{row['condense_minutes']:.0f} / {row['eval_minutes']:.1f} | {gap} |")
    if header["failed"]:
        lines += ["", "Failed (not finite) at a test seed of the chosen setting: "
                  + "; ".join(f"{m} ({why})" for m, why in header["failed"].items()) + "."]
    if header.get("stale"):
        lines += ["", "Not tabled, their carried choice is out of date: "
                  + "; ".join(f"{m} ({why})" for m, why in header["stale"].items()) + "."]
    if any(row.get("still_at_edge") for row in table):
        lines += ["", "A choice still on the edge of its grid (after the points past it, or "
                  "tuned before the grid went past its edges) may not be that method's best."]
    if header["missing"]:
        lines += ["", f"Not finished, so not in the table: {', '.join(header['missing'])}."]
    counts = sorted({row["seeds"] for row in table})
    if len(counts) > 1:
        lines += ["", "The rows stand on different numbers of seeds ("
                  + "; ".join(f"{n}: " + ", ".join(f"`{r['variant']}`" for r in table
                                                   if r["seeds"] == n) for n in counts)
                  + "); each row's spread is over its own seeds x models."]
    return "\n".join(lines) + "\n"


def compare(workdir: str, methods: Sequence[str], command: str = "",
            baselines: Sequence[tuple[str, str]] = ()) -> list[dict]:
    """Write the comparison of the tuned ``methods`` in ``workdir`` and of the untuned
    ``baselines`` (``(study workdir, variant)`` pairs); returns its rows, best first.
    ValueError when none of the methods has finished its tuning and test seeds, or when the
    rows ran under different protocols (``check_protocol``)."""
    rows = {m: method_row(workdir, m) for m in methods}
    for directory, variant in baselines:
        rows[f"{variant} (study)"] = baseline_row(directory, variant)
    failed = {m: r["failed"] for m, r in rows.items() if r is not None and "failed" in r}
    stale = {m: r["stale"] for m, r in rows.items() if r is not None and "stale" in r}
    table = sorted((r for m, r in rows.items()
                    if r is not None and m not in failed and m not in stale),
                   key=lambda r: -r["mean"])
    missing = [m for m, r in rows.items() if r is None]
    if not any(r["chosen"] is not None for r in table):
        raise ValueError(f"no method of {', '.join(methods)} has a finished tuning with its "
                         f"test seeds in {workdir}; run experiments.tune for them first")
    records = {r["variant"]: r.pop("records") for r in table}
    splits = check_protocol(records)
    config = Config.from_dict(records[table[0]["variant"]][0]["config"])
    header = dict(study.machine(), dataset=config.dataset, ipc=config.ipc, command=command,
                  missing=missing, failed=failed, stale=stale, splits=splits,
                  runs=study.provenance(records))
    title = (f"{header['dataset']} IPC {header['ipc']}: each method at the setting chosen on "
             "validation (blue), untuned study rows (grey); test accuracy, mean +- std over "
             "seeds x models")
    colors = [TUNED if r["chosen"] is not None else UNTUNED for r in table]
    study.write_tables(workdir, "comparison", table, header, lambda h: markdown(table, h),
                       lambda path: study.bar_chart(table, path, title, colors=colors))
    return table


__all__ = ["SHARED", "SHARED_CONDENSING", "SHARED_SPLIT", "method_row", "baseline_row",
           "check_protocol", "markdown", "compare"]
