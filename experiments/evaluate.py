"""Evaluate any saved condensed set with the official protocol.

``python -m experiments.evaluate --set runs/cifar10-ipc10/synthetic.npz --arch ResNet18BN``

The set is a ``.npz`` as written by ``idm_jax.checkpoint.export_npz`` (``images`` in [0,1] NHWC,
``labels``; other methods' sets exported to the same keys work too). Images are normalised with
the dataset's constants; partition-and-expand is applied when the file says the set was made with
it (IDM sets), or as ``--expand`` / ``--no-expand`` says.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import jax
import numpy as np

from experiments import common
from idm_jax import checkpoint, data, evaluate, models


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m experiments.evaluate",
                                     description=__doc__.split("\n\n")[0])
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
    common.enable_compilation_cache()
    try:
        if args.arch not in models.MODEL_NAMES:
            raise common.UserError(f"unknown --arch {args.arch!r}; valid: "
                                   f"{', '.join(models.MODEL_NAMES)}")
        saved = checkpoint.load_npz(args.set)
        dataset = data.load_dataset(args.dataset, source=args.source, data_dir=args.data_dir,
                                    tfds_data_dir=args.tfds_data_dir)
        if saved["images"].shape[1:] != dataset.image_shape:
            raise common.UserError(f"the set's images are {saved['images'].shape[1:]} but "
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
        test_x = data.normalize(dataset.test_images, dataset.mean, dataset.std)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except common.UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"evaluating {len(images)} images ({'with' if expand else 'without'} "
          f"partition-and-expand) with {args.num_eval} x {args.arch}, {args.epochs + 1} epochs")
    result = evaluate.evaluate_synset(
        jax.random.PRNGKey(args.seed), images, saved["labels"], test_x, dataset.test_labels,
        model=args.arch, num_classes=dataset.num_classes, num_models=args.num_eval,
        epochs=args.epochs, batch_size=args.batch_train, lr=args.lr, expand=expand,
        partition_factor=factor)
    result.update(set=os.path.abspath(args.set), dataset=args.dataset, expand=expand,
                  device=common.device_description(), jax_version=jax.__version__)
    out = args.out or os.path.splitext(args.set)[0] + f"_eval_{args.arch}.json"
    checkpoint.dump_json(out, result)
    print(f"{args.arch}: {result['mean']:.2f} +- {result['std']:.2f} % "
          f"({', '.join(f'{a:.2f}' for a in result['accuracies'])}); written to {out}")
    return result


if __name__ == "__main__":
    main()
