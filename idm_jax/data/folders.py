"""Readers for image-file folder datasets: TinyImageNet and an ImageNet subset.

TinyImageNet (standard `tiny-imagenet-200` layout):
  root/wnids.txt                       200 wnids
  root/train/<wnid>/images/*.JPEG      500 per class, 64x64
  root/val/images/*.JPEG               10,000 images
  root/val/val_annotations.txt         "<file>\t<wnid>\t<bbox...>" per line
Labels follow the *sorted* wnids (the ImageFolder convention; wnids.txt only
fixes the set of classes). Train images are read class by class, files
sorted by name; val images in the line order of val_annotations.txt.

ImageNet subset (ImageFolder layout; the official ILSVRC val set must first be
sorted into one folder per wnid):
  root/train/<wnid>/*.JPEG
  root/val/<wnid>/*.JPEG
Each image is converted to RGB, its shorter side resized to `image_size`
(bilinear, PIL; long side int(size * long / short)) and centre-cropped to
image_size x image_size, as the official loader's Resize + CenterCrop.
Classes: the wnids of `class_list` (a text file, one wnid per line, in that
label order; the official run uses the repo's class_imagenet_subset.txt, whose
first entries are n02486261, n01692333, n03379051); by default all wnid
folders in train/, sorted. Everything is held in memory as uint8, as the
official code does (about 19 GB for 100 classes at 224).

File names ending in .jpeg/.jpg/.png (any case) are images; others are
ignored. Decoding runs in a thread pool (PIL releases the GIL while decoding).
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Optional, Sequence

import numpy as np

from idm_jax.data import core

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


def load_image(path: str, size: int) -> np.ndarray:
    """One image file -> (size, size, 3) uint8 RGB.

    Images that are not size x size get their shorter side resized to `size`
    (bilinear) and are centre-cropped.
    """
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        if (w, h) != (size, size):
            if w <= h:
                new_w, new_h = size, int(size * h / w)
            else:
                new_w, new_h = int(size * w / h), size
            if (new_w, new_h) != (w, h):
                im = im.resize((new_w, new_h), Image.Resampling.BILINEAR)
            left = int(round((new_w - size) / 2.0))
            top = int(round((new_h - size) / 2.0))
            im = im.crop((left, top, left + size, top + size))
        return np.asarray(im, np.uint8)


def _list_images(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        raise ValueError(f"missing image folder {directory}")
    files = sorted(f for f in os.listdir(directory)
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in "
                         f"{directory}")
    return [os.path.join(directory, f) for f in files]


def _load_images(paths: Sequence[str], size: int,
                 num_workers: Optional[int]) -> np.ndarray:
    out = np.empty((len(paths), size, size, 3), np.uint8)

    def fill(i):
        out[i] = load_image(paths[i], size)

    workers = num_workers or min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        # list() re-raises the first decoding error, if any.
        list(pool.map(fill, range(len(paths))))
    return out


def _read_wnid_list(path: str) -> list[str]:
    if not os.path.exists(path):
        raise ValueError(f"missing class list file {path} (one wnid per line)")
    with open(path) as f:
        wnids = [line.strip() for line in f]
    wnids = [w for w in wnids if w and not w.startswith("#")]
    if len(set(wnids)) != len(wnids):
        raise ValueError(f"{path} lists some wnid more than once")
    if not wnids:
        raise ValueError(f"{path} lists no wnids")
    return wnids


def _subdirs(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        raise ValueError(f"missing folder {directory}")
    return sorted(d for d in os.listdir(directory)
                  if os.path.isdir(os.path.join(directory, d)))


def load_tinyimagenet(root: str, image_size: int = 64,
                      num_workers: Optional[int] = None) -> core.Dataset:
    """TinyImageNet from the standard folder layout (module docstring)."""
    spec = core.DATASET_INFO["tinyimagenet"]
    wnids_path = os.path.join(root, "wnids.txt")
    if os.path.exists(wnids_path):
        wnids = sorted(_read_wnid_list(wnids_path))
    else:
        wnids = _subdirs(os.path.join(root, "train"))
    index = {w: i for i, w in enumerate(wnids)}
    train_paths, train_y = [], []
    for w in wnids:
        files = _list_images(os.path.join(root, "train", w, "images"))
        train_paths += files
        train_y += [index[w]] * len(files)
    ann_path = os.path.join(root, "val", "val_annotations.txt")
    if not os.path.exists(ann_path):
        raise ValueError(f"missing {ann_path} (val file -> wnid table)")
    test_paths, test_y = [], []
    with open(ann_path) as f:
        for line_no, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2 or fields[1] not in index:
                raise ValueError(f"{ann_path}:{line_no}: expected '<file> <wnid> ...' "
                                 f"with a wnid of the train set, got {line.strip()!r}")
            test_paths.append(os.path.join(root, "val", "images", fields[0]))
            test_y.append(index[fields[1]])
    return core.Dataset(
        "tinyimagenet", _load_images(train_paths, image_size, num_workers),
        np.asarray(train_y, np.int32),
        _load_images(test_paths, image_size, num_workers),
        np.asarray(test_y, np.int32), len(wnids), tuple(wnids), spec.mean,
        spec.std)


def load_imagenet_subset(root: str, image_size: int = 224,
                         class_list: Optional[str] = None,
                         num_workers: Optional[int] = None) -> core.Dataset:
    """An ImageNet class subset from ImageFolder-style train/ and val/ folders.

    Args:
      root: folder holding train/<wnid>/ and val/<wnid>/.
      image_size: output side (shorter-side resize + centre crop).
      class_list: text file of wnids, one per line, in label order; None: all
        wnid folders of train/, sorted.
      num_workers: decoding threads (default min(8, cpu count)).
    """
    spec = core.DATASET_INFO["imagenet_subset"]
    wnids = (_read_wnid_list(class_list) if class_list is not None
             else _subdirs(os.path.join(root, "train")))
    splits = {}
    for split in ("train", "val"):
        paths, labels = [], []
        for i, w in enumerate(wnids):
            files = _list_images(os.path.join(root, split, w))
            paths += files
            labels += [i] * len(files)
        splits[split] = (_load_images(paths, image_size, num_workers),
                         np.asarray(labels, np.int32))
    return core.Dataset("imagenet_subset", *splits["train"], *splits["val"],
                        len(wnids), tuple(wnids), spec.mean, spec.std)
