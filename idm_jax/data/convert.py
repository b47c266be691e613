"""Convert a dataset into the project's NumPy-directory format (idm_jax.data.npy_dir).

Run once where the source is available; afterwards the dataset loads anywhere with only NumPy
(``load_dataset(name, source="npy", data_dir=OUT)``), e.g. on GPU machines without
tensorflow_datasets.

  python -m idm_jax.data.convert --tfds NAME [--tfds_data_dir D] --out DIR
  python -m idm_jax.data.convert --cifar_pickle DIR --out DIR
  python -m idm_jax.data.convert --dataset NAME [--source S] [--data_dir D] --out DIR

``--tfds`` takes our name (cifar10, cifar100, mnist, fashion_mnist, svhn) or any TFDS builder name
with a fixed-size uint8 image feature and a class label (``--image_key``/``--label_key``). Known
datasets keep the official mean/std (docs/FAITHFULNESS.md, "data"); for any other dataset the
per-channel mean and (population) std of the train split are computed and written to meta.json.
``--cifar_pickle`` reads the official CIFAR-10/100 python folders; ``--dataset`` converts whatever
``load_dataset`` can load (e.g. TinyImageNet from its folder, to skip JPEG decoding later).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

import numpy as np

from idm_jax import data
from idm_jax.data import npy_dir
from idm_jax.data import tfds_source


def channel_mean_std(images: np.ndarray, block: int = 4096) -> tuple[list, list]:
    """Per-channel mean and population std of (N, H, W, C) uint8 images, in [0,1] units.

    Accumulates sums in float64 block by block so memory stays O(block).
    """
    channels = images.shape[-1]
    total = np.zeros(channels, np.float64)
    total_sq = np.zeros(channels, np.float64)
    for start in range(0, len(images), block):
        x = images[start:start + block].reshape(-1, channels).astype(np.float64) / 255.0
        total += x.sum(axis=0)
        total_sq += (x * x).sum(axis=0)
    count = images.size // channels
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    return mean.tolist(), std.tolist()


def _from_tfds(name: str, tfds_data_dir: Optional[str], args) -> tuple[data.Dataset, dict]:
    ours = {spec.tfds_name: key for key, spec in data.DATASET_INFO.items() if spec.tfds_name}
    name = ours.get(name, name)
    if name in data.DATASET_INFO:
        ds = data.load_dataset(name, source="tfds", tfds_data_dir=tfds_data_dir)
        return ds, {"converted_from": f"tfds:{data.DATASET_INFO[name].tfds_name}",
                    "mean_std": "the official IDM code's constants"}
    arrays, names = tfds_source.load_tfds_arrays(
        name, tfds_data_dir, (args.train_split, args.test_split), args.image_key, args.label_key)
    (train_x, train_y), (test_x, test_y) = arrays[args.train_split], arrays[args.test_split]
    k = len(names) or int(max(train_y.max(), test_y.max())) + 1
    mean, std = channel_mean_std(train_x)
    ds = data.Dataset(name, train_x, train_y, test_x, test_y, k,
                      tuple(names) if names else tuple(str(i) for i in range(k)), mean, std)
    return ds, {"converted_from": f"tfds:{name}", "mean_std": "computed from the train split"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m idm_jax.data.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tfds", metavar="NAME", help="TFDS dataset (our name or a TFDS name)")
    src.add_argument("--cifar_pickle", metavar="DIR",
                     help="official cifar-10-batches-py / cifar-100-python folder (or parent)")
    src.add_argument("--dataset", metavar="NAME", help="any name load_dataset accepts")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (new or empty)")
    p.add_argument("--tfds_data_dir", metavar="D", help="TFDS data folder (default: TFDS's)")
    p.add_argument("--image_key", default="image", help="--tfds: image feature name")
    p.add_argument("--label_key", default="label", help="--tfds: label feature name")
    p.add_argument("--train_split", default="train", help="--tfds: train split name")
    p.add_argument("--test_split", default="test", help="--tfds: test split name")
    p.add_argument("--source", help="--dataset: load_dataset source")
    p.add_argument("--data_dir", help="--dataset: load_dataset data_dir")
    p.add_argument("--image_size", type=int, help="--dataset with source folder: image side")
    p.add_argument("--class_list", help="--dataset imagenet_subset: wnid list file")
    p.add_argument("--chunk_rows", type=int, default=npy_dir.DEFAULT_CHUNK_ROWS,
                   help="images per .npy chunk (default %(default)s)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _convert(args)
    except ValueError as e:  # a user-facing problem: print the message, not a traceback
        parser.exit(2, f"error: {e}\n")


def _convert(args) -> int:
    npy_dir.check_output_dir(args.out)  # fail before a long load, not after
    start = time.time()
    if args.tfds:
        ds, meta = _from_tfds(args.tfds, args.tfds_data_dir, args)
    elif args.cifar_pickle:
        ds = data.load_cifar_pickle(args.cifar_pickle)
        meta = {"converted_from": "cifar python pickle",
                "mean_std": "the official IDM code's constants"}
    else:
        folder_opts = {k: getattr(args, k) for k in ("image_size", "class_list")
                       if getattr(args, k) is not None}
        ds = data.load_dataset(args.dataset, source=args.source, data_dir=args.data_dir,
                               tfds_data_dir=args.tfds_data_dir, **folder_opts)
        meta = {"converted_from": f"load_dataset({args.dataset!r}, source={args.source!r})"}
    npy_dir.save_npy_dir(ds, args.out, chunk_rows=args.chunk_rows, extra_meta=meta)
    print(f"wrote {ds.name}: train {ds.train_images.shape}, test {ds.test_images.shape}, "
          f"{ds.num_classes} classes -> {args.out} ({time.time() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
