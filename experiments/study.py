"""A study: named variants x seeds, one after another, aggregated (``idm_jax.runs.study``).

``python -m experiments.study --source npy --data_dir ../shared/data/cifar10`` runs the CPU
protocol's priority-1 grid (idm, random-real, dm; seeds 0,1,2) into ``runs/study``; re-running
skips finished runs and resumes an interrupted one. ``--variants`` and ``--seeds`` choose the
grid, ``--budget paper`` uses the preset's own settings (accelerators). ``--table_only`` runs
nothing and loads no data: it writes the table of the grid's finished runs, naming the others.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Optional, Sequence

from idm_jax.runs import cli, failures, study


@failures.user_facing
def main(argv: Optional[Sequence[str]] = None) -> list:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m experiments.study", description=__doc__)
    parser.add_argument("--variants", default="idm,random-real,dm",
                        help=f"comma-separated, of: {', '.join(study.VARIANTS)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--ipc", type=int, default=1)
    parser.add_argument("--budget", default="cpu", choices=study.BUDGETS)
    parser.add_argument("--method", default="idm",
                        help="the method every variant starts from: idm, dm or path.py:NAME")
    parser.add_argument("--workdir", default="runs/study")
    parser.add_argument("--source", default=None)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--tfds_data_dir", default=None)
    parser.add_argument("--devices", type=int, default=0)
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars (the evaluation program is then also kept in "
                             "the compilation cache)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field of the budget for every run (repeatable)")
    parser.add_argument("--table_only", action="store_true",
                        help="run nothing: write the table of the runs already finished")
    args = parser.parse_args(argv)
    cli.enable_compilation_cache()
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in study.VARIANTS]
    if unknown or not variants:
        raise cli.UserError(f"--variants: unknown {unknown or 'empty list'}; valid: "
                            f"{', '.join(study.VARIANTS)}")
    cli.refuse_repeats("--variants", variants)
    seeds = cli.seed_list("--seeds", args.seeds)
    overrides = cli.set_overrides(args.set)
    try:
        base = study.budget_config(args.dataset, args.budget, args.ipc, overrides,
                                   args.method)
        for v in variants:
            study.variant_config(base, v, seeds[0])
    except ValueError as err:
        raise cli.UserError(str(err)) from None
    command = "python -m experiments.study " + " ".join(shlex.quote(a) for a in argv)
    try:    # every record already there is read before any work: a bad one is named now
        rows, missing = study.finished_runs(args.workdir, variants, seeds,
                                            dataset=args.dataset, budget=args.budget,
                                            ipc=args.ipc, overrides=overrides,
                                            method=args.method)
    except ValueError as err:
        raise cli.UserError(str(err)) from None
    if args.table_only:
        return _table_only(args, rows, missing, overrides, command)
    args.class_list = None
    dataset = cli.load_data(base, args)
    mesh = cli.build_mesh(args)
    table = study.run_study(dataset, variants, seeds, args.workdir, budget=args.budget,
                            ipc=args.ipc, overrides=overrides, mesh=mesh, quiet=args.quiet,
                            command=command, method=args.method)
    print(open(f"{args.workdir}/study.md").read())
    return table


def _table_only(args, rows, missing, overrides, command) -> list:
    if not rows:
        raise cli.UserError(f"--table_only: no run of this grid has finished in {args.workdir} "
                            f"(a run counts only with the study's --dataset, --budget, --ipc "
                            f"and --set); run the study without --table_only first")
    table = study.write_table(rows, args.workdir, dataset=args.dataset, budget=args.budget,
                              ipc=args.ipc, overrides=overrides, command=command,
                              missing=missing)
    print(open(f"{args.workdir}/study.md").read())
    return table


if __name__ == "__main__":
    main()
