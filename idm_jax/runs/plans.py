"""The project's campaigns (``campaign.PLANS``), each the exact recipe of a table in RESULTS.md.

``fair-cifar10`` is the fair comparison on CIFAR-10 (issue #28) under the CPU protocol: the IPC 1
baselines (random-real mosaics at factors 2 to 4, CE alone, IDM and factor 4, none holding out
a validation split, as they were run), every method tuned at IPC 1 on 500 held-out images per
class, the IPC 10 study rows and each method's IPC 1 choice carried to IPC 10 (all holding out
the same 500 per class), both comparison tables, and a third seed for faithful IDM and for the
two other IPC 10 rows best on validation. Its folders are those of ``docs/study``, so copying
those records into the campaign's folder first makes it skip every run already recorded there
(except the NCFM and IID runs: their records name the pool by the absolute path it had when
they ran, so they are skipped only with the campaign's folder at that path). A pool is made
only while a run that reads it has no record, so a new machine does not retrain the pool of a
method whose runs are all recorded.
"""

from __future__ import annotations

import glob
import json
import math
import os
from typing import Callable, Optional, Sequence

from idm_jax.runs import checkpoint, study, tuning
from idm_jax.runs.campaign import Item, Later, PlanError, Step, register
from idm_jax.runs.grid_run import FAILED_FILE

METHODS = ("idm", "m3d", "dm", "ncfm", "iid")
IPC1_MOSAICS = "random-real,random-real-pf3,random-real-pf4"
IPC1_BASELINES = "ce-only,ce-only-pf4,idm,pf4"
IPC1_TABLE = "pf4,idm,ce-only-pf4,ce-only,random-real-pf4,random-real-pf3,random-real"
IPC10_ROWS = ("idm", "random-real", "pf4", "random-real-pf4",
              "pf3", "random-real-pf3", "dm", "random-real-plain")
THIRD_SEEDS = "third-seeds.json"    # in tune-ipc10: the rows picked for a third seed, kept
VALIDATION = 500          # held-out training images per class, from the tunes on
TRIAL_SEED = 100          # the grids' seed; the test seeds 0, 1 (and 2) took no part in a choice
# About how long each takes from scratch on 2 CPU cores (minutes), for the progress line; a
# tuning whose choice sits on its edge adds up to 3 runs past it (about 8 minutes each at IPC 1).
# Measured where the records say (condensation + evaluation, AMD EPYC / Intel Xeon, 2026-12-04
# to 06): the IPC 10 rows at seed 0, the IDM, M3D and DM tunings, IID's pool and grid (its test
# seeds guessed at an IDM run each); the carries are guesses from one run of each method.
MINUTES = {"ipc1-mosaics": 25, "ipc1-baselines": 150, "pool-ncfm": 20, "pool-iid": 60,
           "tune-idm": 200, "tune-m3d": 60, "tune-dm": 30, "tune-ncfm": 90, "tune-iid": 90,
           "carry-idm": 80, "carry-m3d": 40, "carry-dm": 20, "carry-ncfm": 50,
           "carry-iid": 120, "compare": 1, "third-seeds": 180,
           "idm": 40, "random-real": 20, "pf4": 130, "random-real-pf4": 58, "pf3": 60,
           "random-real-pf3": 36, "dm": 10, "random-real-plain": 6}


@register("fair-cifar10")
def fair_cifar10(workdir: str, source: str, data_dir: str) -> list[Item]:
    """The fair comparison's every command, in the order the project ran them (the cheapest,
    most telling first); ``workdir`` holds ``cpu-ipc1``, ``tune-ipc1``, ``cpu-ipc10``,
    ``tune-ipc10`` and ``pools``."""
    folders = {name: os.path.join(workdir, name)
               for name in ("cpu-ipc1", "tune-ipc1", "cpu-ipc10", "tune-ipc10")}
    data = ("--source", source, "--data_dir", data_dir)
    pool_dir = {m: os.path.join(workdir, "pools", f"cifar10-{m}-val{VALIDATION}")
                for m in ("ncfm", "iid")}
    pool = {m: ("--set", f"pool_dir={path}") for m, path in pool_dir.items()}

    def ipc1_study(variants: str, seeds: str, minutes: float) -> Step:
        return Step(f"IPC 1 study: {variants}, seeds {seeds}", "experiments.study",
                    (*data, "--ipc", "1", "--budget", "cpu", "--variants", variants,
                     "--seeds", seeds, "--workdir", folders["cpu-ipc1"]), minutes,
                    _study_records(folders["cpu-ipc1"], variants.split(","), seeds))

    def ipc10(rows, seeds: str) -> Step:
        return _ipc10_study(data, folders["cpu-ipc10"], rows, seeds)

    tune = {m: _tune(data, folders["tune-ipc1"], m, pool.get(m, ())) for m in METHODS}
    carry = _first_carries(data, folders, pool)
    # A pool is made only while a run that reads it is left: the pool itself (up to about 90
    # MB) stays on the machine that made it, while the run records travel in docs/study.
    made = {m: _pretrain(data, pool_dir[m], m, (tune[m], carry[m]), *flags) for m, flags in
            (("ncfm", ()), ("iid", ("--models", "2", "--epochs", "1")))}
    return [
        ipc1_study(IPC1_MOSAICS, "0,1", MINUTES["ipc1-mosaics"]),
        ipc1_study(IPC1_BASELINES, "0", MINUTES["ipc1-baselines"]),
        tune["idm"],
        ipc10(IPC10_ROWS[:4], "0"),
        tune["m3d"],
        tune["dm"],
        ipc10(IPC10_ROWS[4:], "0"),
        ipc1_study(IPC1_BASELINES, "1", MINUTES["ipc1-baselines"]),
        made["ncfm"],
        tune["ncfm"],
        *(carry[m] for m in METHODS if m != "iid"),
        ipc10(IPC10_ROWS, "1"),
        # IID last: its pool and grid cost an IDM run each, and at IPC 1 it ties IDM.
        made["iid"],
        tune["iid"],
        carry["iid"],
        _compare(folders["tune-ipc1"], f"{folders['cpu-ipc1']}:{IPC1_TABLE}", "the IPC 1 table"),
        _compare(folders["tune-ipc10"], f"{folders['cpu-ipc10']}:{','.join(IPC10_ROWS)}",
                 "the IPC 10 table"),
        Later("a third seed for faithful IDM and the two best other IPC 10 rows",
              lambda: third_seeds(data, folders, pool), MINUTES["third-seeds"],
              _third_seed_records(data, folders, pool)),
        _compare(folders["tune-ipc10"], f"{folders['cpu-ipc10']}:{','.join(IPC10_ROWS)}",
                 "the IPC 10 table with the third seeds"),
        # Each study step tables only its own rows and seeds: the last word on every row.
        _study_table(data, folders["cpu-ipc1"], "1", f"{IPC1_MOSAICS},{IPC1_BASELINES}", "0,1",
                     ()),
        _study_table(data, folders["cpu-ipc10"], "10", ",".join(IPC10_ROWS), "0,1,2",
                     ("--set", f"validation_per_class={VALIDATION}")),
    ]


def _tune(data, workdir: str, method: str, pool: tuple) -> Step:
    """``method`` tuned at IPC 1 on the held-out split, its choice run at seeds 0 and 1."""
    return Step(f"tune {method} at IPC 1", "experiments.tune",
                ("--method", method, *data, "--ipc", "1", "--budget", "cpu",
                 "--validation_per_class", str(VALIDATION), "--trial_seed", str(TRIAL_SEED),
                 "--test_seeds", "0,1", "--workdir", workdir, *pool), MINUTES[f"tune-{method}"],
                _tuning_records(os.path.join(workdir, tuning.folder(method)), (0, 1)))


def _pretrain(data, out: str, method: str, readers: Sequence[Step], *flags: str) -> Step:
    """``method``'s pool of pretrained extractors in ``out``, on the tunings' split; not
    needed once every step in ``readers`` has all its runs recorded."""
    return Step(f"{method}'s pool of pretrained extractors", "experiments.pretrain",
                ("--recipe", method, *data, "--validation_per_class", str(VALIDATION),
                 *flags, "--out", out), MINUTES[f"pool-{method}"], _pool_record(out),
                needed=lambda: not all(map(_finished, readers)))


def _finished(step: Step) -> bool:
    """Every run ``step.progress`` expects is recorded (False when it cannot tell)."""
    recorded, expected = step.progress() if step.progress else (0, 0)
    return expected > 0 and recorded >= expected


def _ipc10_study(data, workdir: str, rows, seeds: str) -> Step:
    return Step(f"IPC 10 study: {','.join(rows)}, seeds {seeds}", "experiments.study",
                (*data, "--ipc", "10", "--budget", "cpu",
                 "--set", f"validation_per_class={VALIDATION}", "--variants", ",".join(rows),
                 "--seeds", seeds, "--workdir", workdir),
                sum(MINUTES[r] for r in rows) * len(seeds.split(",")),
                _study_records(workdir, rows, seeds))


def _study_table(data, workdir: str, ipc: str, rows: str, seeds: str, flags: tuple) -> Step:
    """The table and chart of the study ``rows`` in ``workdir`` over every seed the campaign
    runs (it runs nothing; a seed not run is named under the table)."""
    return Step(f"the IPC {ipc} study table over every row and seed", "experiments.study",
                (*data, "--ipc", ipc, "--budget", "cpu", *flags, "--variants", rows,
                 "--seeds", seeds, "--workdir", workdir, "--table_only"), MINUTES["compare"])


def _first_carries(data, folders: dict, pool: dict) -> dict[str, Step]:
    """Each method's IPC 1 choice carried to IPC 10 on seeds 0 and 1, or 0, 1, 2 once it is
    picked for a third seed: a carry writes its tuning record from the seeds it is given, so
    a re-run of the plan on 0, 1 alone would drop seed 2 from the table."""
    picked = set(_kept_rows(os.path.join(folders["tune-ipc10"], THIRD_SEEDS), quiet=True) or ())
    return {m: _carry(data, folders, m, pool.get(m, ()), "0,1,2" if m in picked else "0,1")
            for m in METHODS}


def _carry(data, folders: dict, method: str, pool: tuple, seeds: str) -> Step:
    """``method``'s IPC 1 choice run at IPC 10 on ``seeds`` (the same split, budget and pool:
    the tuning refuses a carry under other ones)."""
    return Step(f"carry {method}'s IPC 1 choice to IPC 10, seeds {seeds}", "experiments.tune",
                ("--method", method, *data, "--ipc", "10", "--budget", "cpu",
                 "--validation_per_class", str(VALIDATION), "--test_seeds", seeds,
                 "--carry_from", folders["tune-ipc1"], "--workdir", folders["tune-ipc10"], *pool),
                MINUTES[f"carry-{method}"] * len(seeds.split(",")) / 2,
                _records([os.path.join(folders["tune-ipc10"], tuning.folder(method), "chosen",
                                       f"seed{s}") for s in seeds.split(",")]))


def _recorded(directory: str) -> bool:
    """A run in ``directory`` has ended: finished (``results.json``) or failed for good."""
    return any(os.path.isfile(os.path.join(directory, name))
               for name in ("results.json", FAILED_FILE))


def _records(directories: Sequence[str]) -> Callable[[], tuple[int, int]]:
    """A ``Step.progress`` counting the runs of ``directories`` that have ended."""
    return lambda: (sum(map(_recorded, directories)), len(directories))


def _study_records(workdir: str, rows: Sequence[str], seeds: str):
    return _records([study.run_dir(workdir, row, int(seed))
                     for row in rows for seed in seeds.split(",")])


def _tuning_records(root: str, test_seeds: Sequence[int]) -> Callable[[], tuple[int, int]]:
    """A tuning's runs that have ended, out of its grid (``tuning.TRIALS``, or more once
    points past an edge are on disk) and its test seeds; a test run of an earlier choice,
    set aside, does not count; a grid that failed at every setting runs no test seed."""
    def count() -> tuple[int, int]:
        trials = [d for d in glob.glob(os.path.join(root, "*", f"seed{TRIAL_SEED}"))
                  if _recorded(d)]
        try:
            summary = _read_json(os.path.join(root, "tuning.json"))
        except PlanError:                    # not written yet (or unreadable): no verdict
            summary = {}
        tests = [] if tuning.no_choice(summary) else [
            os.path.join(root, "chosen", f"seed{s}") for s in test_seeds]
        return (len(trials) + sum(map(_recorded, tests)),
                max(len(trials), tuning.TRIALS) + len(tests))
    return count


def _pool_record(out: str) -> Callable[[], tuple[int, int]]:
    """A pretraining is one job: done once its ``pool.json`` is written."""
    return lambda: (int(os.path.isfile(os.path.join(out, "pool.json"))), 1)


def _compare(workdir: str, baselines: str, label: str) -> Step:
    return Step(label, "experiments.tune",
                ("--compare", ",".join(METHODS), "--workdir", workdir,
                 "--baselines", baselines), MINUTES["compare"])


def top_rows(table: list[dict], count: int = 2) -> list[str]:
    """The ``count`` rows of a comparison table with the best validation accuracy over their
    test seeds (``validation_mean``, %) that may get a third seed (``_pickable``: not faithful
    IDM's study row, which always gets one, nor the random-real baselines). The table itself is
    ranked by test accuracy; the pick is not, so no decision of the study looks at the test set."""
    pickable = _pickable()
    rows = [r for r in table if r["variant"] in pickable]
    ranked = sorted(rows, key=lambda r: -r["validation_mean"])    # stable on ties
    return [r["variant"] for r in ranked][:count]


def third_seeds(data, folders: dict, pool: dict) -> list[Step]:
    """Seed 2 of faithful IDM's IPC 10 study row and of the two other rows of the IPC 10 table
    (``tune-ipc10/comparison.json``, written by the step before) best on validation
    (``top_rows``): a study row by the study, a tuned method by carrying its choice again on
    seeds 0, 1, 2. The first pick is kept in ``tune-ipc10/third-seeds.json`` and reused: once
    some rows have a third seed the table would rank them on other seed counts, so a re-run
    must not choose again. PlanError when the table is missing, unreadable or not complete (a
    pick from part of it would be kept)."""
    kept = os.path.join(folders["tune-ipc10"], THIRD_SEEDS)
    rows = _kept_rows(kept)
    if rows is None:
        rows = _pick(os.path.join(folders["tune-ipc10"], "comparison.json"))
        checkpoint.dump_json(kept, {"rows": rows})
    return _third_seed_steps(data, folders, pool, rows)


def _third_seed_steps(data, folders: dict, pool: dict, rows: Sequence[str]) -> list[Step]:
    steps = [_ipc10_study(data, folders["cpu-ipc10"], ["idm"], "2")]
    for row in rows:
        if row.endswith(" (study)"):
            steps.append(_ipc10_study(data, folders["cpu-ipc10"], [row[:-len(" (study)")]], "2"))
        else:
            steps.append(_carry(data, folders, row, pool.get(row, ()), "0,1,2"))
    return steps


def _third_seed_records(data, folders: dict, pool: dict) -> Callable[[], tuple[int, int]]:
    """The third seeds' ``progress``: their runs recorded once the pick is kept; (0, 0), cannot
    tell, before it (or when the kept file is unreadable: the step says so when it runs)."""
    def count() -> tuple[int, int]:
        rows = _kept_rows(os.path.join(folders["tune-ipc10"], THIRD_SEEDS), quiet=True)
        if rows is None:
            return 0, 0
        counts = [step.progress() for step in _third_seed_steps(data, folders, pool, rows)]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)
    return count


def _pickable() -> set[str]:
    """The rows a third seed may go to: a tuned method, or an IPC 10 study row (not IDM's,
    which always gets one, nor a random-real baseline)."""
    return {*METHODS, *(f"{r} (study)" for r in IPC10_ROWS
                        if r != "idm" and not r.startswith("random-real"))}


def _kept_rows(kept: str, count: int = 2, quiet: bool = False) -> Optional[list[str]]:
    """The rows kept in ``kept`` (``third-seeds.json``), or None when there is none yet (or,
    with ``quiet``, when it cannot be read or checked); PlanError when it is not ``count``
    distinct rows the table can name."""
    if not os.path.exists(kept):
        return None
    pickable = _pickable()
    try:
        rows = _read_json(kept, "delete it to pick again").get("rows")
        if (not isinstance(rows, list) or len(rows) != count
                or not all(isinstance(r, str) and r in pickable for r in rows)
                or len(set(rows)) != count):
            raise PlanError(f"{kept}: not {count} distinct rows of the IPC 10 table (one of "
                            f"{', '.join(sorted(pickable))}); delete it to pick again")
    except PlanError:
        if quiet:
            return None
        raise
    return rows


def _read_json(path: str, hint: str = "the step before this one writes it (run it, without "
                                        "--skip_steps)") -> dict:
    try:
        with open(path) as f:
            value = json.load(f)
    except OSError as err:
        raise PlanError(f"{path}: {err.strerror or err}; {hint}") from None
    except ValueError as err:
        raise PlanError(f"{path}: not JSON ({err})") from None
    if not isinstance(value, dict):
        raise PlanError(f"{path}: not a JSON object")
    return value


def _pick(path: str, count: int = 2) -> list[str]:
    """The ``count`` rows for a third seed from the comparison written by ``experiments.tune
    --compare``; PlanError if it is not one, names rows not finished, or has too few rows."""
    comparison = _read_json(path)
    table, header = comparison.get("table"), comparison.get("header", {})
    if not isinstance(table, list) or not all(isinstance(r, dict) and "variant" in r
                                              for r in table) or not isinstance(header, dict):
        raise PlanError(f"{path}: no comparison table (a header and rows with a 'variant')")
    # Every row on seeds 0 and 1: a row on fewer would be ranked on other seed counts.
    short = [str(r["variant"]) for r in table if r.get("seeds") != 2]
    unfinished = [*header.get("missing", []), *header.get("failed", {}),
                  *header.get("stale", {}), *(f"{v} (not on 2 seeds)" for v in short)]
    if unfinished:
        raise PlanError(f"{path}: not finished: {', '.join(unfinished)}; the pick needs every "
                        f"row on seeds 0 and 1 (finish their steps, or skip this one too)")
    pickable = _pickable()
    blind = [str(r["variant"]) for r in table
             if r["variant"] in pickable and not _finite(r.get("validation_mean"))]
    if blind:
        raise PlanError(f"{path}: no validation accuracy for {', '.join(blind)}; the pick ranks "
                        f"rows on it (run them with --validation_per_class)")
    rows = top_rows(table, count)
    if len(rows) < count:
        raise PlanError(f"{path}: fewer than {count} rows besides faithful IDM and the "
                        f"random-real baselines")
    return rows


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


__all__ = ["METHODS", "IPC10_ROWS", "fair_cifar10", "top_rows", "third_seeds"]
