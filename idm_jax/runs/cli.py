"""The command line: flags -> config -> ``idm_jax.runs.run.condense_and_evaluate``.

``python -m experiments.<dataset>`` and the ``idm-condense`` entry point (``--dataset NAME``)
call ``main``; the evaluate and report commands are in ``idm_jax.runs.tools``.
Every problem the user can fix is one ``error:`` line and exit status 2; Ctrl-C, SIGTERM or
SIGUSR1 saves a checkpoint and exits with 128 + the signal's number (130, 143, 138).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Optional, Sequence

import jax

from idm_jax import config as config_lib, data, iterating, methods
from idm_jax.runs import checkpoint, failures
from idm_jax.runs import run as run_lib
from idm_jax import validate
from idm_jax.accel import sharding
from idm_jax.runs import workdir as workdir_lib
from idm_jax.config import Config
from idm_jax import presets


UserError = failures.UserError     # raised by the flag checks here and in every entry point


# ----------------------------------------------------------------------------- flags
def build_parser(dataset: str, default_ipc: int,
                 prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m experiments.{dataset}" if prog is None else prog,
        description=f"IDM dataset condensation of {dataset}. Any config field can be set with "
                    f"--FIELD VALUE (e.g. --ce_weight 0.1 --iterations 1000); see "
                    f"idm_jax/config.py for all of them.")
    parser.add_argument("--ipc", type=int, default=None,
                        help=f"images per class (default {default_ipc}; with --preset, the "
                             f"preset's, and a different --ipc is refused)")
    parser.add_argument("--preset", default=None,
                        help=f"named preset (default {dataset}-ipc<IPC>); "
                             f"one of {', '.join(sorted(presets.PRESETS))}")
    parser.add_argument("--workdir", default=None, help="run folder (default runs/<preset>)")
    parser.add_argument("--smoke", action="store_true", help="tiny variant that runs in seconds")
    parser.add_argument("--method", default=None,
                        help=f"the condensation method: {', '.join(methods.METHODS)} (default "
                             f"idm), or path/to/file.py:NAME for your own (README, 'Write your "
                             f"own method'); its settings go over the preset")
    parser.add_argument("--dm", action="store_true", help="the same as --method dm")
    parser.add_argument("--no_components", action="store_true",
                        help="ablation: IDM without partition-expand, queue training and CE "
                             "(IDM's optimiser kept)")
    parser.add_argument("--source", default=None,
                        help="data source: tfds (default for TFDS datasets), npy, pickle, "
                             "digits, folder")
    parser.add_argument("--data_dir", default=None, help="folder for npy / pickle / folder")
    parser.add_argument("--tfds_data_dir", default=None, help="TFDS data folder")
    parser.add_argument("--class_list", default=None, help="imagenet_subset: wnid list file")
    parser.add_argument("--restart", action="store_true",
                        help="start over: the workdir's previous run is moved to "
                             "<workdir>/previous/<time>/ (nothing is deleted)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars (the evaluation program is then also kept in "
                             "the compilation cache)")
    parser.add_argument("--devices", type=int, default=0,
                        help="devices to shard the class axis over (0: all available)")
    parser.add_argument("--distributed", action="store_true",
                        help="multi-host: call jax.distributed.initialize first (see README)")
    parser.add_argument("--coordinator_address", default=None, help="host0:port (--distributed)")
    parser.add_argument("--num_processes", type=int, default=None, help="hosts (--distributed)")
    parser.add_argument("--process_id", type=int, default=None, help="this host (--distributed)")
    return parser


def _overrides(rest: Sequence[str]) -> dict:
    """The flags argparse did not know, as config overrides: ``--FIELD VALUE`` or
    ``--FIELD=VALUE`` -> {FIELD: VALUE (a string)}."""
    overrides, i = {}, 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--"):
            raise UserError(f"unexpected argument {token!r}; config overrides look like "
                            f"--FIELD VALUE")
        name, _, value = token[2:].partition("=")
        if not _:
            if i + 1 >= len(rest):
                raise UserError(f"--{name} needs a value")
            value, i = rest[i + 1], i + 1
        overrides[name] = value
        i += 1
    return overrides


def parse(argv: Optional[Sequence[str]], dataset: str, default_ipc: int,
          prog: Optional[str] = None):
    """Parse run flags and config overrides; returns (args, Config)."""
    parser = build_parser(dataset, default_ipc, prog)
    args, rest = parser.parse_known_args(argv)
    overrides = _overrides(rest)
    if "dataset" in overrides and overrides["dataset"] != dataset:
        raise UserError(f"--dataset {overrides['dataset']}: this command condenses {dataset}; "
                        f"run python -m experiments.{overrides['dataset']} (or idm-condense "
                        f"--dataset {overrides['dataset']}) instead")
    explicit_ipc = args.ipc is not None
    args.ipc = args.ipc if explicit_ipc else default_ipc
    preset = args.preset or f"{dataset}-ipc{args.ipc}"
    try:
        if preset in presets.PRESETS or args.preset:
            config = presets.get_preset(preset)
            if args.preset and explicit_ipc and config.ipc != args.ipc:
                raise UserError(f"--preset {args.preset} is IPC {config.ipc} but --ipc "
                                f"{args.ipc} was given; pass one of them (a preset of another "
                                f"IPC, or --ipc alone)")
        else:  # an ipc without a paper preset: the ipc10 setting with this ipc
            base = presets.get_preset(f"{dataset}-ipc10")
            config = dataclasses.replace(base, ipc=args.ipc)
        if args.dm:
            if args.method not in (None, "dm"):
                raise UserError(f"--dm and --method {args.method} name two methods; pass one")
            args.method = "dm"
        if args.method not in (None, "idm") and args.no_components:
            raise UserError(f"--no_components is an ablation of IDM; it does not combine with "
                            f"--method {args.method}")
        if args.method is not None:
            config = methods.with_method(config, args.method)
        if args.no_components:
            config = presets.without_components(config)
        if args.smoke:
            config = presets.smoke(config)
        if args.preset is None:
            overrides.setdefault("ipc", str(args.ipc))
        config = config_lib.override(config, overrides)
    except ValueError as err:
        raise UserError(str(err)) from None
    if config.dataset != dataset and args.preset is None:
        raise UserError(f"preset {preset} is for {config.dataset}, not {dataset}")
    if args.workdir is None:
        suffix = ((f"-{_method_label(config.method)}" if config.method != "idm" else "")
                  + ("-no-components" if args.no_components else "")
                  + ("-smoke" if args.smoke else ""))
        args.workdir = os.path.join("runs", f"{dataset}-ipc{config.ipc}{suffix}")
    return args, config


def _method_label(spec: str) -> str:
    """A short name for a method in a folder name: ``dm``, or ``file-NAME`` for a file."""
    if not methods.is_file(spec):
        return spec
    path, _, name = spec.rpartition(":") if not spec.endswith(".py") else (spec, "", "METHOD")
    return f"{os.path.splitext(os.path.basename(path))[0]}-{name or 'METHOD'}"


def set_overrides(items: Sequence[str]) -> dict:
    """``--set FIELD=VALUE`` items (repeatable flag of the multi-run commands) as a dict."""
    overrides = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set takes FIELD=VALUE, got {item!r}")
        overrides[field] = value
    return overrides


def seed_list(flag: str, text: str) -> list[int]:
    """A multi-run command's ``--seeds``-style flag: distinct comma-separated integers."""
    try:
        seeds = [int(s) for s in text.split(",") if s]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise UserError(f"{flag} is empty")
    refuse_repeats(flag, seeds)
    return seeds


def refuse_repeats(flag: str, values: Sequence) -> None:
    """A value named twice would count one run twice in a table: refused, naming it."""
    twice = sorted({str(v) for v in values if list(values).count(v) > 1})
    if twice:
        raise UserError(f"{flag} names {', '.join(twice)} more than once; each run counts once, "
                        f"so name each once")


def load_data(config: Config, args) -> data.Dataset:
    """The dataset of the run, with enough images per class for the config
    (``validate.check_data``)."""
    try:
        dataset = data.load_dataset(config.dataset, source=args.source, data_dir=args.data_dir,
                                    tfds_data_dir=args.tfds_data_dir,
                                    class_list=getattr(args, "class_list", None))
        where = args.data_dir or args.tfds_data_dir or args.source or "the default source"
        validate.check_data(config, dataset.class_counts, source=f"{config.dataset} from {where}")
    except (ValueError, FileNotFoundError) as err:
        raise UserError(str(err)) from None
    return dataset


def check_data_for(config: Config, dataset: data.Dataset) -> None:
    """``UserError`` when the loaded ``dataset`` cannot feed a run of ``config`` (after its
    validation split): checked for every run of a multi-run command before the first runs."""
    try:
        train, _ = data.split_validation(dataset, config.validation_per_class,
                                         config.validation_seed)
        validate.check_data(config, train.class_counts, source=f"dataset {dataset.name}")
    except ValueError as err:
        raise UserError(str(err)) from None


def check_before_loading(config: Config, args) -> None:
    """What can be checked before a (possibly big) dataset is read: the config against the
    dataset's usual image shape, and the workdir."""
    spec = data.DATASET_INFO.get(config.dataset)
    # imagenet_subset can be loaded at another size; its shape is checked after loading.
    shape = spec.image_shape if spec is not None and config.dataset != "imagenet_subset" else None
    try:
        validate.check_method(config)
        validate.check_config(config, shape)
        validate.check_workdir(args.workdir)
    except validate.InvalidRun as err:
        raise UserError(str(err)) from None


def build_mesh(args):
    """The device mesh of the run, or None for a single device (the plain code path)."""
    if getattr(args, "distributed", False):
        _start_distributed(args)
    try:
        count = validate.check_devices(getattr(args, "devices", 0), jax.device_count(),
                                       jax.process_count())
    except validate.InvalidRun as err:
        raise UserError(str(err)) from None
    return sharding.make_mesh(count) if count > 1 else None


# Cluster managers that tell jax.distributed where the coordinator is.
_CLUSTER_VARIABLES = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_ID",
                      "CLOUD_TPU_TASK_ID", "MEGASCALE_COORDINATOR_ADDRESS")


def _start_distributed(args) -> None:
    """``--distributed``: join the run's hosts, or one ``UserError`` saying what is missing."""
    if args.coordinator_address is None and not any(v in os.environ
                                                    for v in _CLUSTER_VARIABLES):
        raise UserError("--distributed needs --coordinator_address host:port, --num_processes "
                        "and --process_id on every host (SLURM, Open MPI and Cloud TPU provide "
                        "them, and this machine is none of those)")
    if args.num_processes is not None and args.process_id is not None and not (
            0 <= args.process_id < args.num_processes):
        raise UserError(f"--process_id {args.process_id} with --num_processes "
                        f"{args.num_processes}: give a rank in 0..{args.num_processes - 1}")
    try:
        sharding.initialize_distributed(args.coordinator_address, args.num_processes,
                                        args.process_id)
    except (ValueError, RuntimeError) as err:
        raise UserError(f"--distributed: {err}") from None


def run(config: Config, args, dataset: Optional[data.Dataset] = None) -> dict:
    """The run of parsed flags: checks, the mesh, the data, then ``condense_and_evaluate``."""
    mesh = build_mesh(args)         # first: a multi-host run must initialise before any JAX call
    check_before_loading(config, args)
    dataset = load_data(config, args) if dataset is None else dataset
    try:
        return run_lib.condense_and_evaluate(config, dataset, args.workdir, mesh=mesh,
                                             restart=args.restart, quiet=args.quiet)
    except (validate.InvalidRun, workdir_lib.WorkdirBusy, checkpoint.CheckpointMismatchError,
            iterating.NonFiniteError) as err:
        raise UserError(str(err)) from None


def enable_compilation_cache() -> None:
    """Keep compiled programs on disk so a resumed or repeated run starts without recompiling.

    ``IDM_JAX_COMPILATION_CACHE`` sets the folder (default ~/.cache/idm-jax/xla); "off" disables.
    """
    path = os.environ.get("IDM_JAX_COMPILATION_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "idm-jax", "xla"))
    if path.lower() not in ("", "0", "off", "none"):
        jax.config.update("jax_compilation_cache_dir", path)


@failures.user_facing
def main(dataset: str, default_ipc: int = 10, argv: Optional[Sequence[str]] = None) -> dict:
    """Entry point of ``python -m experiments.<dataset>``."""
    enable_compilation_cache()
    args, config = parse(argv, dataset, default_ipc)
    return run(config, args)


def condense_main(argv: Optional[Sequence[str]] = None) -> None:
    """The ``idm-condense`` entry point: ``--dataset NAME`` (default cifar10), then as ``main``.

    Returns None, so the console script exits with status 0 (errors exit 2, a stop signal
    128 + its number).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    chooser = argparse.ArgumentParser(add_help=False)
    chooser.add_argument("--dataset", default="cifar10")
    known, rest = chooser.parse_known_args(argv)
    if known.dataset not in config_lib.DATASETS:
        print(f"error: unknown --dataset {known.dataset!r}; valid: "
              f"{', '.join(config_lib.DATASETS)}", file=sys.stderr)
        raise SystemExit(2)
    if "-h" in rest or "--help" in rest:
        build_parser(known.dataset, 10, prog="idm-condense").print_help()
        print("\n  --dataset NAME        dataset to condense (default cifar10); one of "
              f"{', '.join(config_lib.DATASETS)}")
        return None
    main(known.dataset, 10, rest)
    return None
