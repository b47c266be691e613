"""The command line: flags -> config -> ``idm_jax.runs.run.condense_and_evaluate``, and evaluation.

``python -m experiments.<dataset>`` and the ``idm-condense`` entry point (``--dataset NAME``)
call ``main``; ``python -m experiments.evaluate`` and ``idm-evaluate`` call ``evaluate_main``.
Every problem the user can fix is one ``error:`` line and exit status 2; Ctrl-C, SIGTERM or
SIGUSR1 saves a checkpoint and exits with 128 + the signal's number (130, 143, 138).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Optional, Sequence

import jax
import numpy as np

from idm_jax import config as config_lib, data, engine, evaluation, methods
from idm_jax.runs import checkpoint, export, failures
from idm_jax.nn import models
from idm_jax.runs import outputs
from idm_jax.runs import run as run_lib
from idm_jax import validate
from idm_jax.accel import sharding
from idm_jax.runs import workdir as workdir_lib
from idm_jax.config import Config

EVALUATE_HELP = ("Evaluate a condensed set with the official protocol: a .npz of images in [0,1] "
                 "NHWC and labels (as idm_jax.runs.export writes), a DC-BENCH res_*.pt file, or "
                 "DD-Ranking's images.pt (labels.pt beside it; or their folder). .npz images are "
                 "normalised with the dataset's constants, .pt tensors are taken as normalised "
                 "already; partition-and-expand is applied when the file says the set was made "
                 "with it (never for .pt sets, which hold the training set as is), or as "
                 "--expand / --no-expand says.")


class UserError(Exception):
    """A problem the user can fix; printed without a traceback."""


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
                             f"one of {', '.join(sorted(config_lib.PRESETS))}")
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
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--devices", type=int, default=0,
                        help="devices to shard the class axis over (0: all available)")
    parser.add_argument("--distributed", action="store_true",
                        help="multi-host: call jax.distributed.initialize first (see README)")
    parser.add_argument("--coordinator_address", default=None, help="host0:port (--distributed)")
    parser.add_argument("--num_processes", type=int, default=None, help="hosts (--distributed)")
    parser.add_argument("--process_id", type=int, default=None, help="this host (--distributed)")
    return parser


def parse(argv: Optional[Sequence[str]], dataset: str, default_ipc: int,
          prog: Optional[str] = None):
    """Parse run flags and config overrides; returns (args, Config)."""
    parser = build_parser(dataset, default_ipc, prog)
    args, rest = parser.parse_known_args(argv)
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
    if "dataset" in overrides and overrides["dataset"] != dataset:
        raise UserError(f"--dataset {overrides['dataset']}: this command condenses {dataset}; "
                        f"run python -m experiments.{overrides['dataset']} (or idm-condense "
                        f"--dataset {overrides['dataset']}) instead")
    explicit_ipc = args.ipc is not None
    args.ipc = args.ipc if explicit_ipc else default_ipc
    preset = args.preset or f"{dataset}-ipc{args.ipc}"
    try:
        if preset in config_lib.PRESETS or args.preset:
            config = config_lib.get_preset(preset)
            if args.preset and explicit_ipc and config.ipc != args.ipc:
                raise UserError(f"--preset {args.preset} is IPC {config.ipc} but --ipc "
                                f"{args.ipc} was given; pass one of them (a preset of another "
                                f"IPC, or --ipc alone)")
        else:  # an ipc without a paper preset: the ipc10 setting with this ipc
            base = config_lib.get_preset(f"{dataset}-ipc10")
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
            config = config_lib.without_components(config)
        if args.smoke:
            config = config_lib.smoke(config)
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
            engine.NonFiniteError) as err:
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
    try:
        args, config = parse(argv, dataset, default_ipc)
        return run(config, args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except run_lib.Interrupted as stop:
        print(stop)
        raise SystemExit(stop.exit_status) from None


def condense_main(argv: Optional[Sequence[str]] = None) -> None:
    """The ``idm-condense`` entry point: ``--dataset NAME`` (default cifar10), then as ``main``.

    Returns None, so the console script exits with status 0 (errors exit 2, a stop signal 128 + its number).
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


# Long (over 60 lines) because it is one flat sequence of checks, each with its own error line,
# before the one evaluation.
@failures.user_facing
def evaluate_main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="idm-evaluate", description=EVALUATE_HELP)
    parser.add_argument("--set", required=True,
                        help="the condensed set: .npz, DC-BENCH .pt, DD-Ranking images.pt or "
                             "its folder")
    parser.add_argument("--arch", default="ConvNet",
                        help=f"architecture, one of {', '.join(models.MODEL_NAMES)}")
    parser.add_argument("--dataset", default=None,
                        help="dataset of the test split (default: the one synthetic.json beside "
                             "the set records, else cifar10)")
    parser.add_argument("--source", default=None)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--tfds_data_dir", default=None)
    parser.add_argument("--num_eval", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=1000, help="epoch_eval_train")
    parser.add_argument("--batch_train", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--expand", dest="expand", action="store_true", default=None)
    parser.add_argument("--no-expand", dest="expand", action="store_false")
    parser.add_argument("--out", default=None, help="results JSON (default: next to the set)")
    args = parser.parse_args(argv)
    enable_compilation_cache()
    try:
        if args.arch not in models.MODEL_NAMES:
            raise UserError(f"unknown --arch {args.arch!r}; valid: "
                                   f"{', '.join(models.MODEL_NAMES)}")
        for flag in ("num_eval", "batch_train"):
            if getattr(args, flag) < 1:
                raise UserError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
        if args.epochs < 0 or not np.isfinite(args.lr) or args.lr < 0:
            raise UserError("--epochs must be >= 0 and --lr a finite number >= 0")
        saved = export.load_set(args.set)
        args.dataset = args.dataset or _recorded_dataset(args.set) or "cifar10"
        out = args.out or os.path.splitext(args.set)[0] + f"_eval_{args.arch}.json"
        _check_writable(out, "--out")
        dataset = data.load_dataset(args.dataset, source=args.source, data_dir=args.data_dir,
                                    tfds_data_dir=args.tfds_data_dir)
        shape = (saved["images_normalized"] if "images_normalized" in saved
                 else saved["images"]).shape[1:]
        if tuple(shape) != dataset.image_shape:
            raise UserError(f"the set's images are {tuple(shape)} but {args.dataset} images "
                            f"are {dataset.image_shape}; pass the --dataset the set was "
                            f"condensed from")
        labels = export.check_set(saved, args.set, dataset.num_classes)
        if "images_normalized" in saved:      # exact stored values of our own sets
            images = saved["images_normalized"]
        else:
            images = (saved["images"] - np.asarray(dataset.mean)) / np.asarray(dataset.std)
        expand = args.expand
        if expand is None:
            expand = bool(saved.get("partition_expand", False))
        factor = int(saved.get("partition_factor", 2))
        scheme = str(saved.get("partition_scheme", "uniform"))
        ratio = float(saved.get("partition_ratio", 0.4))
        test_x = data.normalize(dataset.test_images, dataset.mean, dataset.std)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"evaluating {len(images)} images ({'with' if expand else 'without'} "
          f"partition-and-expand) with {args.num_eval} x {args.arch}, --epochs {args.epochs} "
          f"(epochs 0..{args.epochs}, as the official loop counts them)")
    result = evaluation.evaluate_synset(
        jax.random.PRNGKey(args.seed), images, labels, test_x, dataset.test_labels,
        model=args.arch, num_classes=dataset.num_classes, num_models=args.num_eval,
        epochs=args.epochs, batch_size=args.batch_train, lr=args.lr, expand=expand,
        partition_factor=factor, partition_scheme=scheme, partition_ratio=ratio)
    result.update(set=os.path.abspath(args.set), dataset=args.dataset, expand=expand,
                  device=outputs.device_description(), jax_version=jax.__version__)
    checkpoint.dump_json(out, result)
    print(f"{args.arch}: {result['mean']:.2f} +- {result['std']:.2f} % "
          f"({', '.join(f'{a:.2f}' for a in result['accuracies'])}); written to {out}")
    return result


def _recorded_dataset(set_path: str) -> Optional[str]:
    """The dataset ``synthetic.json`` beside a set records, if there is one."""
    folder = set_path if os.path.isdir(set_path) else os.path.dirname(set_path)
    for candidate in (folder, os.path.dirname(folder)):    # dd_ranking/ sits one level down
        try:
            with open(os.path.join(candidate, "synthetic.json")) as f:
                name = json.load(f).get("dataset")
            return name if isinstance(name, str) else None
        except (OSError, ValueError, AttributeError):
            continue
    return None


def _check_writable(path: str, flag: str) -> None:
    """``UserError`` unless ``path`` can be written (checked before any long work)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder; give a file name")
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UserError(f"{flag} {path} cannot be written (permission denied); choose another "
                        f"path")


def evaluate_entry() -> None:
    """The ``idm-evaluate`` entry point (``evaluate_main`` returning None: exit status 0)."""
    evaluate_main()


@failures.user_facing
def report_main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    """``python -m experiments.report WORKDIR...``: where each run stands, and its metrics.png."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.report",
        description="Summarise run folders (iterations, checkpoints, time, accuracy) and draw "
                    "each one's metrics.png. Reads the files only; safe beside a running run.")
    parser.add_argument("workdirs", nargs="+", help="run folders")
    args = parser.parse_args(argv)
    missing = [w for w in args.workdirs if not os.path.isfile(os.path.join(w, "config.json"))]
    if missing:
        print(f"error: {missing[0]} is not a run folder (it has no config.json)", file=sys.stderr)
        raise SystemExit(2)
    for folder in args.workdirs:
        problem = _run_config_problem(os.path.join(folder, "config.json"))
        if problem:
            print(f"error: {os.path.join(folder, 'config.json')} {problem}; it is not a run's "
                  f"record (restore it from results.json or a checkpoint, or re-run)",
                  file=sys.stderr)
            raise SystemExit(2)
    summaries = []
    for folder in args.workdirs:
        s = outputs.summarize(folder)
        # A folder shared read-only still gets its summary, without a picture.
        plot = outputs.save_metrics_plot(folder) if os.access(folder, os.W_OK) else None
        minutes = s["condense_seconds"] / 60
        state = ("finished" if s["final"] else f"running ({s['running']})" if s["running"]
                 else "stopped")
        line = (f"{folder}: {s['dataset']} ipc {s['ipc']}, iteration {s['logged_iterations']}/"
                f"{s['target_iterations']}, {state}, {minutes:.1f} min condensing in "
                f"{s['sessions']} session(s); checkpoints {s['checkpoints'] or 'none'}")
        if s["damaged"]:
            line += f", damaged set aside {s['damaged']}"
        if s["final"]:
            line += f"; final {s['final'][0]:.2f} +- {s['final'][1]:.2f} %"
        elif s["evaluations"]:
            it, mean, std = s["evaluations"][-1]
            line += f"; at iteration {it} {mean:.2f} +- {std:.2f} %"
        print(line + (f"; plot {plot}" if plot else ""))
        summaries.append(s)
    return summaries


def _run_config_problem(path: str) -> Optional[str]:
    """Why ``path`` is not a run's config.json, or None when it is one."""
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as err:
        return f"cannot be read as JSON ({type(err).__name__})"
    if not isinstance(saved, dict) or not {"dataset", "ipc", "iterations"} <= set(saved):
        return "lacks the fields every run writes (dataset, ipc, iterations)"
    return None


def report_entry() -> None:
    report_main()
