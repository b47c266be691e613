"""Tune one method on a validation split, then report it on fresh seeds (``idm_jax.runs.tuning``).

``python -m experiments.tune --method m3d --source npy --data_dir ../shared/data/cifar10`` runs
the method's grid (10 settings, and up to 3 more past its edge while the best sits there) at
``--trial_seed`` on the CPU protocol, each run holding out
``--validation_per_class`` training images per class, chooses the setting with the best
validation accuracy, runs it at ``--test_seeds`` and writes ``<workdir>/<method>/tuning.md``.
The grid's settings are condensed together, sharing one extractor schedule (the queue: it never
sees the images), which gives each the images of its own run at about one run's queue cost;
``--separate`` runs them one by one. Re-running skips finished runs and resumes an interrupted
one. ``--carry_from W --ipc 10`` runs no grid: it takes the setting the method's tuning in ``W``
chose at another IPC and runs it at ``--ipc`` on the test seeds. ``--compare idm,m3d,dm`` runs
nothing: it tables the methods tuned in ``--workdir`` side by side (``comparison.md``, ``.json``,
``.png``), with ``--baselines STUDY_WORKDIR:random-real,idm`` adding untuned study rows.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Optional, Sequence

from idm_jax.runs import cli, comparison, failures, study, tuning, tuning_report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.tune", description=__doc__)
    parser.add_argument("--method", default="idm", help="idm, dm, m3d or path.py:NAME")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--ipc", type=int, default=1)
    parser.add_argument("--budget", default="cpu", choices=study.BUDGETS)
    parser.add_argument("--validation_per_class", type=int, default=500)
    parser.add_argument("--trial_seed", type=int, default=None, help="the grid's seed (100)")
    parser.add_argument("--test_seeds", default="0,1", help="comma-separated seeds")
    parser.add_argument("--workdir", default="runs/tune")
    parser.add_argument("--source", default=None)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--tfds_data_dir", default=None)
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars (the evaluation program is then also kept in "
                             "the compilation cache)")
    parser.add_argument("--separate", action="store_true",
                        help="condense the grid's settings one after another instead of in one "
                             "program sharing their extractors (same images, about T times "
                             "the queue training)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field of the budget for every run (repeatable)")
    parser.add_argument("--carry_from", default=None, metavar="WORKDIR",
                        help="no grid: run the setting that the method's tuning in WORKDIR "
                             "chose at another IPC, at --ipc on --test_seeds (the same "
                             "--validation_per_class, --budget and --set)")
    parser.add_argument("--compare", default=None, metavar="METHODS",
                        help="run nothing: table the tuned methods (comma-separated) found in "
                             "--workdir side by side (comparison.md, .json, .png)")
    parser.add_argument("--baselines", action="append", default=[],
                        metavar="STUDY_WORKDIR:VARIANTS",
                        help="with --compare: add these study variants (comma-separated; every "
                             "finished seed in the study's workdir) as untuned rows; "
                             "repeatable")
    return parser


def _refuse_unused_flags(args) -> None:
    """A flag that the chosen mode would ignore: one error line naming it."""
    unused = ([("--carry_from", args.carry_from is not None)] if args.compare is not None
              else [("--baselines", bool(args.baselines))])
    if args.carry_from is not None:
        unused += [("--separate", args.separate), ("--trial_seed", args.trial_seed is not None)]
    for flag, given in unused:
        if given:
            mode = "--compare" if args.compare is not None else (
                "--carry_from" if args.carry_from is not None else "a tuning")
            raise cli.UserError(f"{flag}: not used with {mode}; leave it out")


@failures.user_facing
def main(argv: Optional[Sequence[str]] = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    command = "python -m experiments.tune " + " ".join(shlex.quote(a) for a in argv)
    _refuse_unused_flags(args)
    if args.compare is not None:
        return _compare(args, command)
    cli.enable_compilation_cache()
    test_seeds = cli.seed_list("--test_seeds", args.test_seeds)
    overrides = cli.set_overrides(args.set)
    for field in ("validation_per_class", "seed", "lr_img", "ce_weight", "calibration_weight"):
        if field in overrides:
            raise cli.UserError(f"--set {field}=... : the tuning sets {field} itself; use "
                                f"its own flag or leave it to the grid")
    try:
        base = study.budget_config(args.dataset, args.budget, args.ipc, overrides,
                                   args.method)
        if args.carry_from is not None:     # checked before any data is read
            tuning.carried_choice(args.carry_from, args.method, args.dataset, args.ipc,
                                  args.validation_per_class, workdir=args.workdir,
                                  budget=args.budget, overrides=overrides)
    except ValueError as err:
        raise cli.UserError(str(err)) from None
    args.class_list, args.devices = None, 1
    dataset = cli.load_data(base, args)
    try:
        summary = _run(args, dataset, test_seeds, overrides, command)
    except ValueError as err:
        raise cli.UserError(str(err)) from None
    print(tuning_report.markdown(summary))
    return summary


def _run(args, dataset, test_seeds, overrides, command) -> dict:
    common = dict(ipc=args.ipc, budget=args.budget, test_seeds=test_seeds,
                  validation_per_class=args.validation_per_class, overrides=overrides,
                  quiet=args.quiet, command=command)
    if args.carry_from is not None:
        return tuning.run_carried(dataset, args.method, args.workdir, args.carry_from, **common)
    trial_seed = 100 if args.trial_seed is None else args.trial_seed
    return tuning.run_tuning(dataset, args.method, args.workdir, trial_seed=trial_seed,
                             together=not args.separate, **common)


def _compare(args, command: str) -> list:
    tuned = [m.strip() for m in args.compare.split(",") if m.strip()]
    if not tuned:
        raise cli.UserError("--compare: name the tuned methods to table, e.g. --compare idm,m3d")
    cli.refuse_repeats("--compare", tuned)
    if not os.path.isdir(args.workdir):
        raise cli.UserError(f"--workdir {args.workdir} does not exist: it must hold the tunings "
                            f"to compare")
    baselines = []
    for spec in args.baselines:
        directory, _, names = spec.rpartition(":")
        variants = [v for v in names.split(",") if v]
        unknown = [v for v in variants if v not in study.VARIANTS]
        if not directory or not variants or unknown:
            raise cli.UserError(f"--baselines {spec}: give STUDY_WORKDIR:VARIANT[,VARIANT...] "
                                f"with variants of {', '.join(study.VARIANTS)}")
        if not os.path.isdir(directory):
            raise cli.UserError(f"--baselines {spec}: {directory} does not exist")
        baselines += [(directory, v) for v in variants]
    cli.refuse_repeats("--baselines", [v for _, v in baselines])
    try:
        table = comparison.compare(args.workdir, tuned, command, baselines)
    except ValueError as err:
        raise cli.UserError(f"--compare: {err}") from None
    with open(os.path.join(args.workdir, "comparison.md")) as f:
        print(f.read())
    return table


if __name__ == "__main__":
    main()
