"""Pretrain a pool of networks on the run's own training data (``idm_jax.pretrain``).

``python -m experiments.pretrain --recipe ncfm --source npy --data_dir ../shared/data/cifar10``
trains the networks NCFM draws its extractors from and writes ``pool.npz`` and ``pool.json`` to
``--out`` (default ``runs/pools/<dataset>-<recipe>``); ``--method ncfm --pool_dir`` reads it.
The job keeps its place in ``--out`` (``progress.npz``, every two minutes and on Ctrl-C or
SIGTERM): the same command continues it.
The defaults are sized for 2 CPU cores (4 networks, 2 epochs); the authors' sizes are
``--models 20 --epochs 60`` (NCFM) and ``--models 1000 --epochs 40`` (IID). Hold out the same
``--validation_per_class`` (and seed) as the runs that will use the pool, so that it never saw
their validation images.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Optional, Sequence

import jax

from idm_jax import config as config_lib, data, pretrain
from idm_jax.nn import models
from idm_jax.runs import cli, failures, pretraining

SAVE_EVERY_S = 120.0     # seconds of training a stop can lose at most (SIGKILL, power cut)


def _advance(bar, done: int, total: int) -> None:
    """Move the bar to ``done`` of ``total`` SGD steps (all epochs), with its ETA."""
    if bar.total is None:     # the first block of this session (maybe resumed): rates start here
        bar.total, bar.initial, bar.n, bar.last_print_n = total, done, done, done
        bar.refresh()
    else:
        bar.update(done - bar.n)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.pretrain", description=__doc__)
    parser.add_argument("--recipe", default="ncfm", choices=sorted(pretrain.RECIPES))
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--source", default=None)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--tfds_data_dir", default=None)
    parser.add_argument("--model", default=None,
                        help="architecture (default: the recipe's; it must be the --model of "
                             "the runs that read the pool)")
    parser.add_argument("--models", type=int, default=4, help="networks in the pool")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per network")
    parser.add_argument("--validation_per_class", type=int, default=0)
    parser.add_argument("--validation_seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="the pool's folder")
    return parser


@failures.user_facing
def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = _parser().parse_args(argv)
    cli.enable_compilation_cache()
    for flag in ("models", "epochs"):
        if getattr(args, flag) < 1:
            raise cli.UserError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.dataset not in config_lib.DATASETS:
        raise cli.UserError(f"--dataset {args.dataset!r} is not known; valid: "
                            f"{', '.join(config_lib.DATASETS)}")
    out = args.out or os.path.join("runs", "pools", f"{args.dataset}-{args.recipe}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise cli.UserError(f"--out {out} is a file; give a folder")
    recipe = dataclasses.replace(pretrain.RECIPES[args.recipe], epochs=args.epochs)
    if args.model is not None:
        if args.model not in models.MODEL_NAMES:
            raise cli.UserError(f"--model {args.model!r} is not a known architecture; "
                                f"valid: {', '.join(models.MODEL_NAMES)}")
        recipe = dataclasses.replace(recipe, model=args.model)
    try:
        dataset = data.load_dataset(args.dataset, source=args.source, data_dir=args.data_dir,
                                    tfds_data_dir=args.tfds_data_dir)
        _, split = data.split_validation(dataset, args.validation_per_class,
                                         args.validation_seed)
        net = models.get_model(recipe.model, dataset.num_classes,
                               in_channels=dataset.image_shape[-1])
        jax.eval_shape(net.init, jax.random.PRNGKey(0),     # the network fits the images
                       jax.ShapeDtypeStruct((1,) + dataset.image_shape, jax.numpy.float32))
    except (ValueError, FileNotFoundError) as err:
        raise cli.UserError(f"{err}" if "--" in str(err) else
                            f"--recipe {args.recipe} / --model {recipe.model} on "
                            f"{args.dataset}: {err}") from None
    print(f"pretraining {args.models} x {recipe.model} for {recipe.epochs} epochs on "
          f"{args.dataset} ({args.recipe} recipe) -> {out}")
    from tqdm import tqdm
    bar = tqdm(total=None, unit="step", desc="pretrain", dynamic_ncols=True)
    try:
        meta = pretraining.pretrain_pool(out, dataset, args.recipe, recipe, args.models,
                                         args.seed, args.validation_per_class,
                                         args.validation_seed,
                                         progress=lambda done, total: _advance(bar, done, total),
                                         save_every_s=SAVE_EVERY_S)
    finally:
        bar.close()
    print(f"pool in {out}; training accuracy of the last epoch "
          f"{', '.join(f'{a:.1f}' for a in meta['train_accuracy'])} %")
    return meta


if __name__ == "__main__":
    main()
