"""The evaluate and report commands: a saved set scored with the official protocol, and where
run folders stand.

``python -m experiments.evaluate`` and ``idm-evaluate`` call ``evaluate_main``;
``python -m experiments.report`` and ``idm-report`` call ``report_main``. As in ``runs.cli``,
every problem the user can fix is one ``error:`` line (exit status 2; 1 for the machine's).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

import jax
import numpy as np

from idm_jax import data, evaluation
from idm_jax.nn import models
from idm_jax.runs import checkpoint, export, failures, outputs
from idm_jax.runs.cli import UserError, enable_compilation_cache

EVALUATE_HELP = ("Evaluate a condensed set with the official protocol: a .npz of images in [0,1] "
                 "NHWC and labels (as idm_jax.runs.export writes), a DC-BENCH res_*.pt file, or "
                 "DD-Ranking's images.pt (labels.pt beside it; or their folder). .npz images are "
                 "normalised with the dataset's constants, .pt tensors are taken as normalised "
                 "already; partition-and-expand is applied when the file says the set was made "
                 "with it (never for .pt sets, which hold the training set as is), or as "
                 "--expand / --no-expand says.")


def _evaluate_parser() -> argparse.ArgumentParser:
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
    return parser


def _check_evaluate_flags(args) -> None:
    if args.arch not in models.MODEL_NAMES:
        raise UserError(f"unknown --arch {args.arch!r}; valid: {', '.join(models.MODEL_NAMES)}")
    for flag in ("num_eval", "batch_train"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.epochs < 0 or not np.isfinite(args.lr) or args.lr < 0:
        raise UserError("--epochs must be >= 0 and --lr a finite number >= 0")


def _prepared_set(args) -> tuple:
    """The set of ``--set`` checked against its dataset, before any training: (dataset,
    normalised images, labels, the partition arguments of ``evaluate_synset``, the --out path,
    checked writable)."""
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
    partition_args = dict(
        expand=bool(saved.get("partition_expand", False)) if args.expand is None else args.expand,
        partition_factor=int(saved.get("partition_factor", 2)),
        partition_scheme=str(saved.get("partition_scheme", "uniform")),
        partition_ratio=float(saved.get("partition_ratio", 0.4)))
    return dataset, images, labels, partition_args, out


@failures.user_facing
def evaluate_main(argv: Optional[Sequence[str]] = None) -> dict:
    args = _evaluate_parser().parse_args(argv)
    enable_compilation_cache()
    _check_evaluate_flags(args)
    try:
        dataset, images, labels, partition_args, out = _prepared_set(args)
    except (ValueError, FileNotFoundError) as err:
        raise UserError(str(err)) from None
    expand = partition_args["expand"]
    test_x = data.normalize(dataset.test_images, dataset.mean, dataset.std)
    print(f"evaluating {len(images)} images ({'with' if expand else 'without'} "
          f"partition-and-expand) with {args.num_eval} x {args.arch}, --epochs {args.epochs} "
          f"(epochs 0..{args.epochs}, as the official loop counts them)")
    bar, progress = outputs.evaluation_bar(args.num_eval, args.epochs, args.arch)
    try:
        result = evaluation.evaluate_synset(
            jax.random.PRNGKey(args.seed), images, labels, test_x, dataset.test_labels,
            model=args.arch, num_classes=dataset.num_classes, num_models=args.num_eval,
            epochs=args.epochs, batch_size=args.batch_train, lr=args.lr, progress=progress,
            **partition_args)
    finally:
        bar.close()
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
