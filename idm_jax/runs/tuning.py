"""Tuning a method honestly: a grid chosen on a validation split, reported on fresh seeds.

For one method on one budget (``study.budget_config``), every run holds out the same
``validation_per_class`` training images per class (``data.split_validation``), so no run
condenses from them. The grid (``grid``) runs once each at the trial seed; the setting with the
best mean validation accuracy is chosen (test accuracy takes no part; among equals the one
nearest the method's default), and that setting alone is then run at the test seeds, which must
differ from the trial seed (a grid whose every point failed has no choice, and runs none).
Every method gets ``TRIALS`` grid points (and, when the best of them sits on the grid's
learning-rate edge, up to ``EDGE_STEPS`` more past it, one grid step each, while the best point
stays on the edge; the CE weight's axis is not extended):

- a method with a CE term (IDM's ``syn_ce``, NCFM's ``calibration_weight``): the image learning
  rate at 1/100, 1/10, 1, 10 and 100 times its default, each with that term's weight at 1/5 and
  1 times its default;
- a method without: the learning rate at 10^(k/2) times its default, k = -4 .. 5.

Runs live in ``<workdir>/<method>/<trial>/seed<k>`` and resume like a study's; a run whose loss
or images stop being finite (a step size too large) is recorded as failed (``failed.json``) and
ranks last. Each record carries the gradient norm of every loss term at iteration 0
(``record_grad_norms``), so the grid table shows why a step size was right or wrong.

``run_carried`` reports a method at another IPC without a second grid: the setting its tuning
chose (same split, budget and overrides) runs at the new IPC on the test seeds, recorded with
``carried_from`` (where and on what validation the choice was made).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional, Sequence

import numpy as np

from idm_jax import iterating
from idm_jax.config import Config
from idm_jax.runs import grid_run, study
from idm_jax.runs.grid_run import FAILED_FILE
from idm_jax.runs.tuning_report import no_choice, setting_text, terms_off, write

TRIALS = 10
EDGE_STEPS = 3        # at most this many points past a grid edge the choice sits on
LR_FACTORS_WITH_CE = (0.01, 0.1, 1.0, 10.0, 100.0)
CE_FACTORS = (0.2, 1.0)
LR_FACTORS = tuple(10.0 ** (k / 2) for k in range(-4, 6))


def grid(config: Config) -> list[dict]:
    """The ``TRIALS`` settings tried for the method of ``config`` (field -> value)."""
    weight = ("ce_weight" if config.syn_ce else
              "calibration_weight" if config.calibration_weight > 0 else None)
    if weight:
        points = [{"lr_img": config.lr_img * f, weight: getattr(config, weight) * g}
                  for f in LR_FACTORS_WITH_CE for g in CE_FACTORS]
    else:
        points = [{"lr_img": config.lr_img * f} for f in LR_FACTORS]
    assert len(points) == TRIALS
    return points


def trial_name(point: dict) -> str:
    """A folder name for a grid point: ``lr_img=0.02,ce_weight=0.5`` (a value a record lacks:
    ``unknown``)."""
    return ",".join(f"{k}={v:.4g}" if isinstance(v, (int, float)) else f"{k}=unknown"
                    for k, v in point.items())


def _run_or_record(config: Config, dataset, directory: str, quiet: bool, label: str) -> dict:
    """The finished results of ``config`` in ``directory``, running it if needed; a run that
    stopped being finite is recorded in ``failed.json`` and returned as ``{"failed": why}``."""
    record = grid_run.failed_record(config, directory)
    if record is not None:
        return record
    results = study.finished(directory, config)
    if results is not None:
        print(f"== {label}: done ({results['mean']:.2f} %), skipped")
        return results
    from idm_jax.runs import run as run_lib
    print(f"== {label} -> {directory}")
    try:
        return run_lib.condense_and_evaluate(config, dataset, directory, quiet=quiet)
    except iterating.NonFiniteError as err:
        record = grid_run.record_failure(config, directory, str(err))
        print(f"== {label}: failed ({err})")
        return record


def validation_score(results: dict) -> float:
    """The mean validation accuracy of a run; -inf for a failed run or one without a split."""
    held_out = results.get("validation", {})
    return float(held_out["mean"]) if "mean" in held_out else -math.inf


def choose(trials: Sequence[tuple[dict, dict]], default: Optional[dict] = None) -> int:
    """Index of the grid point with the best validation score; among equals, the one nearest
    (in decades) to ``default``, the method's own setting, then the first."""
    scores = [validation_score(results) for _, results in trials]

    def distance(point):
        return sum(abs(math.log10(point[k] / default[k])) for k in point
                   if default and default.get(k) and point[k] > 0)

    return max(range(len(scores)), key=lambda i: (scores[i], -distance(trials[i][0]), -i))


def run_tuning(dataset, method: str, workdir: str, *, ipc: int = 1, budget: str = "cpu",
               validation_per_class: int = 500, trial_seed: int = 100,
               test_seeds: Sequence[int] = (0, 1), overrides: Optional[dict] = None,
               quiet: bool = False, command: str = "", together: bool = True) -> dict:
    """Run the grid at ``trial_seed``, choose on validation, run the choice at ``test_seeds``;
    write ``tuning.md`` and ``tuning.json`` under ``<workdir>/<method>``. Returns the summary.

    ``together``: condense the grid's unfinished settings in one program sharing the
    extractors (``runs.grid_run``; the same images as separate runs, about one queue's cost);
    False runs them one after another."""
    if trial_seed in test_seeds:
        raise ValueError(f"--test_seeds {list(test_seeds)} include the trial seed "
                         f"{trial_seed}: the reported accuracy must come from seeds that took "
                         f"no part in the choice")
    if validation_per_class < 1:
        raise ValueError("--validation_per_class must be >= 1: the choice is made on it")
    overrides = dict(overrides or {}, validation_per_class=validation_per_class)
    base = study.budget_config(dataset.name, budget, ipc, overrides, method)
    root = os.path.join(workdir, folder(method))
    points = grid(base)
    configs = [dataclasses.replace(base, seed=trial_seed, **point) for point in points]
    directories = [os.path.join(root, trial_name(point), f"seed{trial_seed}")
                   for point in points]
    if together:
        grid_run.condense_grid(configs, dataset, directories,
                               os.path.join(root, f"grid-seed{trial_seed}"), quiet=quiet)
    trials = []
    for number, (point, config, directory) in enumerate(zip(points, configs, directories), 1):
        trials.append((point, _run_or_record(config, dataset, directory, quiet,
                                             f"{method} trial {number}/{len(points)}")))
    default = {"lr_img": base.lr_img, "ce_weight": base.ce_weight,
               "calibration_weight": base.calibration_weight}
    trials += _past_the_edge(trials, default, base, trial_seed, dataset, root, quiet, method)
    best = choose(trials, default)
    if "failed" in trials[best][1]:
        # No setting is finite: the choice is only the least bad failure, not worth testing.
        print(f"== every setting of {method}'s grid failed: no choice, no test seed run")
        tests = []
    else:
        tests = _run_test_seeds(base, trials[best][0], test_seeds, dataset, root, quiet,
                                method)
    summary = _summary(method, base, trials, best, tests, trial_seed, test_seeds, command,
                       budget=budget, overrides=overrides, grid_size=len(points))
    write(summary, root)
    return summary


def _run_test_seeds(base: Config, chosen: dict, test_seeds, dataset, root: str, quiet: bool,
                    method: str) -> list[dict]:
    _set_aside_other_choices(root, base, chosen, test_seeds)
    tests = []
    for seed in test_seeds:
        config = dataclasses.replace(base, seed=seed, **chosen)
        directory = os.path.join(root, "chosen", f"seed{seed}")
        tests.append(_run_or_record(config, dataset, directory, quiet,
                                    f"{method} chosen setting, test seed {seed}"))
    return tests


def ran_setting(directory: str, keys) -> Optional[dict]:
    """The values of ``keys`` the run in ``directory`` was made with, from its
    ``results.json``, ``failed.json`` or (a run with checkpoints only) ``config.json``; a key
    the record lacks is its default, as ``study.finished`` reads it. None when the folder holds
    none of them."""
    for name in ("results.json", FAILED_FILE, "config.json"):
        try:
            with open(os.path.join(directory, name)) as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue
        config = record if name == "config.json" else record.get("config", {})
        defaults = Config()
        return {k: config.get(k, getattr(defaults, k, None)) for k in keys}
    return None


def _set_aside_other_choices(root: str, base: Config, chosen: dict,
                             seeds: Sequence[int]) -> None:
    """Per test seed, a run in ``chosen/seed<k>`` of another setting than ``chosen`` (the
    choice changed since, e.g. the grid went past its edge) moves to
    ``chosen-<its setting>/seed<k>``: its checkpoints would be refused and its record is not of
    this choice. A run of ``chosen`` set aside so before (the choice came back) moves back when
    it is a finished or failed run of this very test (``base`` at that seed)."""
    for seed in seeds:
        here = os.path.join(root, "chosen", f"seed{seed}")
        ran = ran_setting(here, chosen)
        if ran is not None and ran != chosen:
            name, number = f"chosen-{trial_name(ran)}", 1
            aside = os.path.join(root, name, f"seed{seed}")
            while os.path.exists(aside):
                number += 1
                aside = os.path.join(root, f"{name}-{number}", f"seed{seed}")
            os.makedirs(os.path.dirname(aside), exist_ok=True)
            os.replace(here, aside)
            print(f"== the choice is now {setting_text(chosen)}; seed {seed}'s test run of "
                  f"{setting_text(ran)} moved to {aside}")
        back = os.path.join(root, f"chosen-{trial_name(chosen)}", f"seed{seed}")
        config = dataclasses.replace(base, seed=seed, **chosen)
        if not os.path.exists(here) and os.path.isdir(back) and (
                study.finished(back, config) is not None
                or grid_run.failed_record(config, back) is not None):
            os.makedirs(os.path.dirname(here), exist_ok=True)
            os.replace(back, here)
            print(f"== seed {seed}'s test run of {setting_text(chosen)} moved back from {back}")


def carried_choice(source: str, method: str, dataset: str, ipc: int,
                   validation_per_class: int, *, workdir: str = "", budget: str = "cpu",
                   overrides: Optional[dict] = None) -> tuple[dict, dict]:
    """The tuning of ``method`` in the workdir ``source`` whose choice is to be carried to
    ``ipc`` into ``workdir``: (its ``tuning.json``, the chosen setting's grid row), checked to
    be a grid's own finished choice of this method and dataset at another IPC, on the same
    validation split, budget and ``--set`` overrides (where the tuning recorded them), and not
    a failed setting. ValueError says what does not fit."""
    flag = f"--carry_from {source}"
    if workdir and os.path.realpath(workdir) == os.path.realpath(source):
        raise ValueError(f"{flag}: that is --workdir itself; carry into another workdir (the "
                         f"carried record would replace the tuning's)")
    path = os.path.join(source, folder(method), "tuning.json")
    if not os.path.exists(path):
        raise ValueError(f"{flag}: no tuning of {method} there ({path} is missing); run "
                         f"experiments.tune for it first")
    with open(path) as f:
        summary = json.load(f)
    here = dict(method=method, dataset=dataset, validation_per_class=validation_per_class,
                budget=budget, overrides=json.loads(json.dumps(dict(
                    overrides or {}, validation_per_class=validation_per_class))))
    wrong = {k: (summary[k], v) for k, v in here.items()
             if summary.get(k, v) != v}    # budget, overrides: not recorded before c0e54af
    if wrong:
        raise ValueError(f"{flag}: that tuning differs in " + ", ".join(
            f"{k} ({a!r} there, {b!r} here)" for k, (a, b) in wrong.items()))
    if summary.get("ipc") == ipc or summary.get("carried_from"):
        raise ValueError(f"{flag}: that is a tuning at IPC {ipc} or itself carried; carry a "
                         f"grid's own choice to another IPC")
    trial = next((row for row in summary.get("grid", [])
                  if row["setting"] == summary.get("chosen")), None)
    if trial is None or trial["failed"]:
        raise ValueError(f"{flag}: the tuning's chosen setting {summary.get('chosen')} is "
                         f"{'a failed run' if trial else 'not in its grid'}; nothing to carry")
    return summary, trial


def run_carried(dataset, method: str, workdir: str, source: str, *, ipc: int,
                budget: str = "cpu", validation_per_class: int = 500,
                test_seeds: Sequence[int] = (0, 1), overrides: Optional[dict] = None,
                quiet: bool = False, command: str = "") -> dict:
    """Run the setting a tuning in ``source`` chose at another IPC, at ``ipc`` on
    ``test_seeds`` (no grid here: the choice was made there, on the same validation split);
    write ``tuning.json`` and ``tuning.md`` under ``<workdir>/<method>`` with an empty grid and
    ``carried_from`` naming the tuning, its IPC and the validation accuracy the choice saw.
    The setting's values are carried as they are (not as factors of the method's default)."""
    origin, trial = carried_choice(source, method, dataset.name, ipc, validation_per_class,
                                   workdir=workdir, budget=budget, overrides=overrides)
    if origin["trial_seed"] in test_seeds:
        raise ValueError(f"--test_seeds {list(test_seeds)} include the trial seed "
                         f"{origin['trial_seed']} of the tuning carried from {source}")
    overrides = dict(overrides or {}, validation_per_class=validation_per_class)
    base = study.budget_config(dataset.name, budget, ipc, overrides, method)
    root = os.path.join(workdir, folder(method))
    chosen = origin["chosen"]
    tests = _run_test_seeds(base, chosen, test_seeds, dataset, root, quiet, method)
    summary = _summary(method, base, [], None, tests, origin["trial_seed"], test_seeds,
                       command, chosen=chosen, budget=budget, overrides=overrides)
    edge = edge_state(origin)
    summary["carried_from"] = {
        "workdir": source, "ipc": origin["ipc"], "chosen": chosen,
        "trials": edge["trials"], "past_edge": edge["past_edge"],
        "still_at_edge": edge["still_at_edge"],
        "grid_failed": sum(1 for row in origin["grid"] if row["failed"]),
        "validation": trial["validation"], "validation_std": trial["validation_std"]}
    write(summary, root)
    return summary


def beyond_edge(trials: Sequence[tuple[dict, dict]], best: int) -> Optional[dict]:
    """The next learning rate past the grid's edge, one grid step on (the ratio of the two
    outermost rates), when the best point's ``lr_img`` is the largest or the smallest among
    the points that share its other settings; None when it lies inside, or when the best point
    failed (then every point failed: there is no best point, so no edge to pass)."""
    point, results = trials[best]
    if "failed" in results:
        return None
    others = {k: v for k, v in point.items() if k != "lr_img"}
    row = sorted(p["lr_img"] for p, _ in trials
                 if {k: v for k, v in p.items() if k != "lr_img"} == others)
    if len(row) < 2 or row[0] < point["lr_img"] < row[-1]:
        return None
    ratio = row[-1] / row[-2] if point["lr_img"] == row[-1] else row[0] / row[1]
    return dict(point, lr_img=point["lr_img"] * ratio)


def _past_the_edge(trials, default, base, trial_seed, dataset, root, quiet, method) -> list:
    """Up to ``EDGE_STEPS`` points past the edge while the best point sits on one: a choice on
    a grid's edge says only that the best setting may lie further. The same rule for every
    method; it adds nothing to a grid whose best point is inside it."""
    extra = []
    for step in range(1, EDGE_STEPS + 1):
        point = beyond_edge(trials + extra, choose(trials + extra, default))
        if point is None:
            break
        config = dataclasses.replace(base, seed=trial_seed, **point)
        directory = os.path.join(root, trial_name(point), f"seed{trial_seed}")
        extra.append((point, _run_or_record(config, dataset, directory, quiet,
                                            f"{method} past the grid's edge {step}/"
                                            f"{EDGE_STEPS}")))
    return extra


def edge_state(summary: dict) -> dict:
    """How a tuning's grid ended: ``trials`` (its own points), ``past_edge`` (points added past
    its edge) and ``still_at_edge`` (the choice still on the edge after them; for a tuning made
    before the edge rule, whether its choice sits on the edge, with ``before_edge_rule``)."""
    rows = summary["grid"]
    past = sum(1 for row in rows if row.get("past_edge"))
    before_rule = "still_at_edge" not in summary
    on_edge = summary.get("still_at_edge") if not before_rule else _on_edge(rows, summary["chosen"])
    return {"trials": len(rows) - past, "past_edge": past, "still_at_edge": bool(on_edge),
            "before_edge_rule": before_rule}


def _on_edge(rows: list[dict], chosen: dict) -> bool:
    """Whether ``chosen`` sits on the learning-rate edge of the tabled grid ``rows``."""
    trials = [(row["setting"], {"failed": row["failed"]} if row["failed"] else
               {"validation": {"mean": row["validation"]}} if row["validation"] is not None
               else {}) for row in rows]
    best = next((i for i, row in enumerate(rows) if row["setting"] == chosen), None)
    return best is not None and beyond_edge(trials, best) is not None


def folder(method: str) -> str:
    """A folder name for a method spec (a file spec keeps only its file and object names)."""
    return method.replace(os.sep, "_").replace(":", "-")


def _summary(method, base, trials, best, tests, trial_seed, test_seeds, command,
             chosen: Optional[dict] = None, budget: str = "cpu",
             overrides: Optional[dict] = None, grid_size: Optional[int] = None) -> dict:
    rows = []
    for number, (point, results) in enumerate(trials):
        rows.append({"setting": point, "failed": results.get("failed"),
                     "past_edge": grid_size is not None and number >= grid_size,
                     "validation": results.get("validation", {}).get("mean"),
                     "validation_std": results.get("validation", {}).get("std"),
                     "grad_norms_it0": results.get("grad_norms_it0"),
                     "terms_off": terms_off(results["config"])
                     if "config" in results else None})
    test_accuracies = np.array([a for r in tests if "accuracies" in r for a in r["accuracies"]])
    n = int(test_accuracies.size)
    mean = float(test_accuracies.mean()) if n else None
    std = float(test_accuracies.std()) if n else None        # population std, as the study
    return {"method": method, "dataset": base.dataset, "ipc": base.ipc,
            "validation_per_class": base.validation_per_class, "trial_seed": trial_seed,
            "test_seeds": list(test_seeds), "grid": rows,
            "chosen": trials[best][0] if chosen is None else chosen,
            "still_at_edge": chosen is None and beyond_edge(trials, best) is not None,
            "test": {"mean": mean, "std": std, "models": n,
                     "seed_means": [float(np.mean(r["accuracies"]))
                                    for r in tests if "accuracies" in r],
                     "failed": [r["failed"] for r in tests if "failed" in r]},
            "budget": budget, "overrides": overrides or {},
            "machine": study.machine(), "command": command}



__all__ = ["FAILED_FILE", "TRIALS", "EDGE_STEPS", "grid", "trial_name", "folder",
           "validation_score", "choose", "beyond_edge", "no_choice", "edge_state", "ran_setting",
           "run_tuning", "carried_choice", "run_carried"]
