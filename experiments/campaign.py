"""Run a whole campaign of experiments, one command after another (``idm_jax.runs.campaign``).

``python -m experiments.campaign --plan fair-cifar10 --source npy --data_dir
../shared/data/cifar10 --workdir runs/fair`` runs every command behind RESULTS.md's fair
comparison (issue #28: 22 steps, about 43 hours on 2 CPU cores) in the order the project ran them, each
in its own process. Every command skips finished runs and resumes an interrupted one, so the
same campaign command continues where it stopped; Ctrl-C or SIGTERM is passed to the running
command, which saves its place. ``--dry_run`` prints the commands and runs nothing. To continue
from the project's own records instead of from scratch, copy them in first:
``mkdir -p runs/fair && cp -r docs/study/{cpu-ipc1,tune-ipc1,cpu-ipc10} runs/fair/``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

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
    return parser


@failures.user_facing
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.plan not in campaign.PLANS:
        raise cli.UserError(f"--plan {args.plan!r} is not known; valid: "
                            f"{', '.join(sorted(campaign.PLANS))}")
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
    print(campaign.describe(items))
    if args.dry_run:
        return 0
    os.makedirs(args.workdir, exist_ok=True)
    try:
        with workdir_lib.lock(args.workdir):     # one campaign per folder (each step locks its own)
            campaign.run(items)
    except workdir_lib.WorkdirBusy as err:
        raise cli.UserError(str(err)) from None
    except campaign.CampaignStopped as stopped:
        print(stopped if stopped.requested else f"error: {stopped}", file=sys.stderr)
        raise SystemExit(stopped.status) from None
    print(f"campaign {args.plan} done: the tables are in {args.workdir}")
    return 0


if __name__ == "__main__":
    main()
