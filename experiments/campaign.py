"""Run a whole campaign of experiments, one command after another (``idm_jax.runs.campaign``).

``python -m experiments.campaign --plan fair-cifar10 --source npy --data_dir
../shared/data/cifar10 --workdir runs/fair`` runs every command behind RESULTS.md's fair
comparison (issue #28: 24 steps, about 38 hours on 2 CPU cores) in the order the project ran
them, each in its own process. Every command skips finished runs and resumes an interrupted one,
so the same campaign command continues where it stopped; Ctrl-C or SIGTERM is passed to the
running command, which saves its place (a closed terminal asks it with SIGTERM; on Linux so does
a campaign killed outright). ``--dry_run`` prints the commands, each with what its run
records on disk say it has left (``[done]``, ``[2 of 4 runs recorded, about 75 min left]``),
and runs nothing; ``--skip_steps 9,12-13`` leaves out those steps (numbered as ``--dry_run``
prints them), e.g. one that keeps failing while the rest can go on. To continue from the
project's own records instead of from scratch, copy them in first (the NCFM and IID runs are
skipped only with their pools at the paths the records name): ``mkdir -p runs/fair && cp -r
docs/study/{cpu-ipc1,tune-ipc1,cpu-ipc10} runs/fair/``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import experiments
from idm_jax import data
from idm_jax.runs import campaign, cli, failures, workdir as workdir_lib
from idm_jax.runs import plans  # noqa: F401 - the project's plans register themselves


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.campaign", description=__doc__)
    parser.add_argument("--plan", default="fair-cifar10",
                        help=f"one of: {', '.join(sorted(campaign.PLANS))}")
    parser.add_argument("--workdir", default="runs/fair", help="every run's folder is in it")
    parser.add_argument("--source", default="npy")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--dry_run", action="store_true",
                        help="print the plan's commands with their estimated times; run nothing")
    parser.add_argument("--skip_steps", default="",
                        help="steps to leave out, by the numbers --dry_run prints: '9,12-13'")
    return parser


def _step_numbers(text: str, count: int) -> set[int]:
    """``--skip_steps`` ('9,12-13') as a set of step numbers in 1..count; UserError if not."""
    numbers = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, dash, last = part.partition("-")
        try:
            span = range(int(first), int(last if dash else first) + 1)
        except ValueError:
            raise cli.UserError(f"--skip_steps {text!r}: {part!r} is not a step number or a "
                                f"range like 12-13 (a step's parts, 21.1, go with it: 21)"
                                ) from None
        if not span:
            raise cli.UserError(f"--skip_steps {text!r}: {part!r} is an empty range; write the "
                                f"smaller number first")
        if span[0] < 1 or span[-1] > count:
            raise cli.UserError(f"--skip_steps {text!r}: {part!r} is outside the plan's steps "
                                f"1 to {count} (see --dry_run)")
        numbers.update(span)
    return numbers


@failures.user_facing
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.plan not in campaign.PLANS:
        raise cli.UserError(f"--plan {args.plan!r} is not known; valid: "
                            f"{', '.join(sorted(campaign.PLANS))}")
    if args.source not in data.SOURCES:
        raise cli.UserError(f"--source {args.source!r} is not known; valid: "
                            f"{', '.join(data.SOURCES)}")
    if args.data_dir is None:
        raise cli.UserError("--data_dir: give the folder of the dataset (e.g. "
                            "../shared/data/cifar10); a campaign never downloads")
    if not os.path.isdir(args.data_dir):
        raise cli.UserError(f"--data_dir {args.data_dir}: no such folder")
    if os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
        raise cli.UserError(f"--workdir {args.workdir} is a file; give a folder")
    # The steps run from the repository root: absolute paths keep the user's meaning.
    items = campaign.PLANS[args.plan](os.path.abspath(args.workdir), args.source,
                                      os.path.abspath(args.data_dir))
    skip = _step_numbers(args.skip_steps, len(items))
    print(campaign.describe(items, skip))
    if args.dry_run:
        return 0
    os.makedirs(args.workdir, exist_ok=True)
    # The steps are ``python -m experiments.<name>``: run them from where this one came from.
    root = os.path.dirname(os.path.dirname(os.path.abspath(experiments.__file__)))
    try:
        with workdir_lib.lock(args.workdir):     # one campaign per folder (each step locks its own)
            campaign.run(items, skip=skip, root=root)
    except (workdir_lib.WorkdirBusy, campaign.PlanError) as err:
        raise cli.UserError(str(err)) from None
    except campaign.CampaignStopped as stopped:
        try:
            print(stopped if stopped.requested else f"error: {stopped}", file=sys.stderr)
        except OSError:                     # a closed terminal: the status still tells
            pass
        raise SystemExit(stopped.status) from None
    print(f"campaign {args.plan} done: the tables are in {args.workdir}")
    return 0


if __name__ == "__main__":
    main()
