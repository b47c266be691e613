"""The command line: flags -> config -> ``idm_jax.run.condense_and_evaluate``, and evaluation.

``python -m experiments.<dataset>`` and the ``idm-condense`` entry point (``--dataset NAME``)
call ``main``; ``python -m experiments.evaluate`` and ``idm-evaluate`` call ``evaluate_main``.
Every problem the user can fix is one ``error:`` line and exit status 2; Ctrl-C saves a
checkpoint and exits with 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Optional, Sequence

import jax
import numpy as np

from idm_jax import checkpoint, config as config_lib, data, engine, evaluation, models, outputs
from idm_jax import run as run_lib
from idm_jax import sharding
from idm_jax.config import Config

EVALUATE_HELP = ("Evaluate a saved condensed set (.npz with images in [0,1] NHWC and labels, as "
                 "idm_jax.checkpoint.export_npz writes) with the official protocol. Images are "
                 "normalised with the dataset's constants; partition-and-expand is applied when "
                 "the file says the set was made with it, or as --expand / --no-expand says.")


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
    parser.add_argument("--ipc", type=int, default=default_ipc, help="images per class")
    parser.add_argument("--preset", default=None,
                        help=f"named preset (default {dataset}-ipc<IPC>); "
                             f"one of {', '.join(sorted(config_lib.PRESETS))}")
    parser.add_argument("--workdir", default=None, help="run folder (default runs/<preset>)")
    parser.add_argument("--smoke", action="store_true", help="tiny variant that runs in seconds")
    parser.add_argument("--dm", action="store_true",
                        help="DM itself on this budget: its optimiser (lr 1, one summed step), a "
                             "fresh random extractor each iteration, real init, no PE, no CE")
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
                        help="ignore existing checkpoints in the workdir and start over")
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
    preset = args.preset or f"{dataset}-ipc{args.ipc}"
    try:
        if preset in config_lib.PRESETS or args.preset:
            config = config_lib.get_preset(preset)
        else:  # an ipc without a paper preset: the ipc10 setting with this ipc
            base = config_lib.get_preset(f"{dataset}-ipc10")
            config = dataclasses.replace(base, ipc=args.ipc)
        if args.dm and args.no_components:
            raise UserError("--dm and --no_components are two different baselines; pass one")
        if args.dm:
            config = config_lib.dm(config)
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
        suffix = (("-dm" if args.dm else "") + ("-no-components" if args.no_components else "")
                  + ("-smoke" if args.smoke else ""))
        args.workdir = os.path.join("runs", f"{dataset}-ipc{config.ipc}{suffix}")
    return args, config


def load_data(config: Config, args) -> data.Dataset:
    try:
        dataset = data.load_dataset(config.dataset, source=args.source, data_dir=args.data_dir,
                                    tfds_data_dir=args.tfds_data_dir,
                                    class_list=getattr(args, "class_list", None))
        if config.init != "noise":  # every init draw takes ipc distinct images of a class
            data.check_enough_per_class(dataset, config.ipc,
                                        f"for ipc={config.ipc} with init={config.init}")
    except (ValueError, FileNotFoundError) as err:
        raise UserError(str(err)) from None
    return dataset


def build_mesh(args):
    """The device mesh of the run, or None for a single device (the plain code path)."""
    if getattr(args, "distributed", False):
        sharding.initialize_distributed(args.coordinator_address, args.num_processes,
                                        args.process_id)
    count = getattr(args, "devices", 0) or jax.device_count()
    if count > jax.device_count():
        raise UserError(f"--devices {count} but only {jax.device_count()} are available")
    if jax.process_count() > 1 and count != jax.device_count():
        raise UserError(f"with {jax.process_count()} hosts the run uses every device of every "
                        f"host ({jax.device_count()}); drop --devices {count}")
    return sharding.make_mesh(count) if count > 1 else None


def run(config: Config, args, dataset: Optional[data.Dataset] = None) -> dict:
    """The run of parsed flags: the mesh, the data, then ``condense_and_evaluate``."""
    mesh = build_mesh(args)
    dataset = load_data(config, args) if dataset is None else dataset
    try:
        return run_lib.condense_and_evaluate(config, dataset, args.workdir, mesh=mesh,
                                             restart=args.restart, quiet=args.quiet)
    except checkpoint.CheckpointMismatchError as err:
        raise UserError(f"{err} (or pass --restart to overwrite it)") from None
    except engine.NonFiniteError as err:
        raise UserError(str(err)) from None


def enable_compilation_cache() -> None:
    """Keep compiled programs on disk so a resumed or repeated run starts without recompiling.

    ``IDM_JAX_COMPILATION_CACHE`` sets the folder (default ~/.cache/idm-jax/xla); "off" disables.
    """
    path = os.environ.get("IDM_JAX_COMPILATION_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "idm-jax", "xla"))
    if path.lower() not in ("", "0", "off", "none"):
        jax.config.update("jax_compilation_cache_dir", path)


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
        raise SystemExit(130) from None


def condense_main(argv: Optional[Sequence[str]] = None) -> None:
    """The ``idm-condense`` entry point: ``--dataset NAME`` (default cifar10), then as ``main``.

    Returns None, so the console script exits with status 0 (errors exit 2, Ctrl-C 130).
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


def evaluate_main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="idm-evaluate", description=EVALUATE_HELP)
    parser.add_argument("--set", required=True, help="path of the condensed set (.npz)")
    parser.add_argument("--arch", default="ConvNet",
                        help=f"architecture, one of {', '.join(models.MODEL_NAMES)}")
    parser.add_argument("--dataset", default="cifar10", help="dataset of the test split")
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
        saved = checkpoint.load_npz(args.set)
        dataset = data.load_dataset(args.dataset, source=args.source, data_dir=args.data_dir,
                                    tfds_data_dir=args.tfds_data_dir)
        if saved["images"].shape[1:] != dataset.image_shape:
            raise UserError(f"the set's images are {saved['images'].shape[1:]} but "
                                   f"{args.dataset} images are {dataset.image_shape}; pass the "
                                   f"--dataset the set was condensed from")
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
          f"partition-and-expand) with {args.num_eval} x {args.arch}, {args.epochs + 1} epochs")
    result = evaluation.evaluate_synset(
        jax.random.PRNGKey(args.seed), images, saved["labels"], test_x, dataset.test_labels,
        model=args.arch, num_classes=dataset.num_classes, num_models=args.num_eval,
        epochs=args.epochs, batch_size=args.batch_train, lr=args.lr, expand=expand,
        partition_factor=factor, partition_scheme=scheme, partition_ratio=ratio)
    result.update(set=os.path.abspath(args.set), dataset=args.dataset, expand=expand,
                  device=outputs.device_description(), jax_version=jax.__version__)
    out = args.out or os.path.splitext(args.set)[0] + f"_eval_{args.arch}.json"
    checkpoint.dump_json(out, result)
    print(f"{args.arch}: {result['mean']:.2f} +- {result['std']:.2f} % "
          f"({', '.join(f'{a:.2f}' for a in result['accuracies'])}); written to {out}")
    return result


def evaluate_entry() -> None:
    """The ``idm-evaluate`` entry point (``evaluate_main`` returning None: exit status 0)."""
    evaluate_main()
