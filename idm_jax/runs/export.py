"""The condensed set in the layouts that people and other toolkits read, and reading them back.

A run's folder gets (``export_set``):

  synthetic.npz           the stored set: images in [0,1] NHWC, the exact normalised values,
                          labels, mean/std and how it is expanded (``export_npz``)
  synthetic_expanded.npz  the training set the evaluation sees: every stored image expanded by
                          the run's partition, class-major, with explicit labels
  synthetic.json          metadata: dataset, classes, normalisation, partition, stored and
                          effective IPC, iteration, code version
  synthetic_png/<class>/  one PNG per image of the expanded set, a folder per class
  res_IDM_<DATASET>_<model>_<ipc>ipc.pt   DC-BENCH's layout: {"data": [[images, labels]]}
  dd_ranking/images.pt, dd_ranking/labels.pt   DD-Ranking's layout

The two ``.pt`` layouts hold the expanded set as (N, C, H, W) float32 tensors in the network's
input space (normalised with the dataset's mean/std, the convention of DC/DM/IDM code) and int64
labels; they are written and read by ``idm_jax.runs.torch_format``, so PyTorch is never needed. The
file names carry the *stored* IPC, the budget the method is compared at. ``load_set`` reads any
of these (and sets released by other methods in the same layouts) for ``idm-evaluate``.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from typing import Optional, Sequence

import numpy as np

from idm_jax import partition
from idm_jax.runs import torch_format

FORMATS = ("npz", "expanded", "png", "torch")
# DC-BENCH spells dataset names as the DC code does.
_DCBENCH_NAMES = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "svhn": "SVHN", "mnist": "MNIST",
                  "fashion_mnist": "FashionMNIST", "tinyimagenet": "TinyImageNet"}


def export_npz(path: str, images, labels, mean, std, **extra) -> None:
    """Write a condensed set for any framework: images in [0,1] (de-normalised), NHWC float32.

    Keys: ``images`` (N, H, W, C) float32 in [0,1] pixel units (clipped), ``labels`` (N,) int32,
    ``mean`` and ``std`` (C,) normalisation constants, ``images_normalized`` (the exact stored
    values, which ``(images - mean) / std`` only reproduces up to clipping), plus ``extra``.
    """
    images = np.asarray(images, np.float32)
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    pixels = np.clip(images * std + mean, 0.0, 1.0)
    tmp = path + ".tmp.npz"
    np.savez(tmp, images=pixels, images_normalized=images, labels=np.asarray(labels, np.int32),
             mean=mean, std=std, **extra)
    os.replace(tmp, path)  # never leave a half-written file under the final name


def load_npz(path: str) -> dict:
    """Read an exported set; returns a dict with at least images, labels (and what was saved)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no condensed set at {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            out = {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path} is not a readable .npz file ({type(err).__name__}); it may be "
                         f"truncated or of another format") from None
    missing = {"images", "labels"} - set(out)
    if missing:
        raise ValueError(f"{path} lacks {sorted(missing)}; expected the keys written by "
                         f"idm_jax.runs.export.export_npz (images in [0,1] NHWC, labels)")
    if out["images"].ndim != 4 or out["labels"].shape != out["images"].shape[:1]:
        raise ValueError(f"{path}: images must be (N, H, W, C) and labels (N,), got "
                         f"{out['images'].shape} and {out['labels'].shape}")
    return out


def expanded_set(images: np.ndarray, labels: np.ndarray, scheme: str = "uniform",
                 factor: int = 2, ratio: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """The training images of a stored set, class-major: (N, H, W, C), (N,) ->
    (N * pieces, H, W, C), (N * pieces,), every class's images contiguous and in label order
    (within a class: piece-major, as ``partition.expand`` orders them)."""
    expanded = np.asarray(partition.expand(np.asarray(images, np.float32), scheme, factor, ratio))
    tiled = np.asarray(partition.expand_labels(np.asarray(labels), scheme, factor))
    order = np.argsort(tiled, kind="stable")
    return expanded[order], tiled[order]


def _folder_name(index: int, name: str) -> str:
    return f"{index:03d}_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def write_png_folders(directory: str, pixels: np.ndarray, labels: np.ndarray,
                      class_names: Sequence[str]) -> None:
    """One PNG per image (``pixels`` (N, H, W, C) in [0,1]) under ``directory/<k>_<name>/``."""
    from PIL import Image

    counts: dict[int, int] = {}
    values = (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)
    for image, label in zip(values, np.asarray(labels)):
        label = int(label)
        folder = os.path.join(directory, _folder_name(label, class_names[label]))
        os.makedirs(folder, exist_ok=True)
        n = counts.get(label, 0)
        counts[label] = n + 1
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
            os.path.join(folder, f"{n:05d}.png"))


def dcbench_name(dataset: str, model: str, ipc: int) -> str:
    return f"res_IDM_{_DCBENCH_NAMES.get(dataset, dataset)}_{model}_{ipc}ipc.pt"


def _export_torch(directory: str, train_x: np.ndarray, train_y: np.ndarray,
                  name: str) -> dict:
    """The expanded set as DC-BENCH's ``name`` and DD-Ranking's images.pt / labels.pt (NCHW
    float32, int64 labels); returns the files written."""
    nchw = np.ascontiguousarray(train_x.transpose(0, 3, 1, 2))
    torch_labels = train_y.astype(np.int64)
    torch_format.save(os.path.join(directory, name), {"data": [[nchw, torch_labels]]})
    os.makedirs(os.path.join(directory, "dd_ranking"), exist_ok=True)
    torch_format.save(os.path.join(directory, "dd_ranking", "images.pt"), nchw)
    torch_format.save(os.path.join(directory, "dd_ranking", "labels.pt"), torch_labels)
    return {"dcbench": name, "dd_ranking": "dd_ranking/"}


def export_set(directory: str, images: np.ndarray, labels: np.ndarray, mean, std, *,
               dataset: str, class_names: Sequence[str], model: str, ipc: int,
               partition_expand: bool, partition_scheme: str, partition_factor: int,
               partition_ratio: float, normalized: bool = True, iteration: Optional[int] = None,
               code_version: Optional[str] = None, formats: Sequence[str] = FORMATS) -> dict:
    """Write the stored set ``images`` (K*ipc, H, W, C, normalised with ``mean``/``std``) in
    ``formats`` (see the module docstring) plus ``synthetic.json``; returns that metadata.

    ``normalized=False`` (the ImageNet-script quirk) means the stored values are [0,1] pixels.
    """
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown export formats {sorted(unknown)}; valid: {', '.join(FORMATS)}")
    images, labels = np.asarray(images, np.float32), np.asarray(labels)
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    os.makedirs(directory, exist_ok=True)
    if not normalized:           # the stored values are pixels: export them unscaled
        mean, std = np.zeros_like(mean), np.ones_like(std)
    expand = dict(scheme=partition_scheme, factor=partition_factor, ratio=partition_ratio)
    pieces = partition.pieces_per_image(partition_scheme, partition_factor) if partition_expand \
        else 1
    files = {}
    if "npz" in formats:
        export_npz(os.path.join(directory, "synthetic.npz"), images, labels, mean, std,
                   partition_expand=partition_expand, partition_factor=partition_factor,
                   partition_scheme=partition_scheme, partition_ratio=partition_ratio,
                   normalized=normalized)
        files["stored"] = "synthetic.npz"
    if set(formats) & {"expanded", "png", "torch"}:
        train_x, train_y = (expanded_set(images, labels, **expand) if partition_expand
                            else (images, labels))
        if "expanded" in formats:
            export_npz(os.path.join(directory, "synthetic_expanded.npz"), train_x, train_y,
                       mean, std, partition_expand=False, normalized=normalized)
            files["expanded"] = "synthetic_expanded.npz"
        if "png" in formats:
            write_png_folders(os.path.join(directory, "synthetic_png"),
                              train_x * std + mean, train_y, class_names)
            files["png"] = "synthetic_png/"
        if "torch" in formats:
            files.update(_export_torch(directory, train_x, train_y,
                                       dcbench_name(dataset, model, ipc)))
    meta = {
        "dataset": dataset, "num_classes": len(class_names), "class_names": list(class_names),
        "image_shape": list(images.shape[1:]), "layout": "NHWC, class-major",
        "stored_ipc": ipc, "effective_ipc": ipc * pieces, "pieces_per_image": pieces,
        "partition_expand": partition_expand, "partition_scheme": partition_scheme,
        "partition_factor": partition_factor, "partition_ratio": partition_ratio,
        "mean": mean.tolist(), "std": std.tolist(),
        "stored_values": "normalized: (pixel - mean) / std" if normalized else "pixels in [0,1]",
        "torch_layouts": "expanded set, (N, C, H, W) float32 normalised, int64 labels",
        "iteration": iteration, "code_version": code_version, "files": files}
    tmp = os.path.join(directory, "synthetic.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, os.path.join(directory, "synthetic.json"))
    return meta


def load_set(path: str) -> dict:
    """Read a condensed set from any layout ``export_set`` writes, or another method's release.

    ``path``: a ``.npz`` (``load_npz``), a DC-BENCH ``.pt`` ({"data": [..., [images, labels]]},
    the last entry is read), a DD-Ranking ``images.pt`` (``labels.pt`` beside it) or the folder
    holding both. Returns a dict with ``labels`` (N,) and either ``images`` ([0,1] pixels,
    ``.npz``) or ``images_normalized`` (NHWC, the ``.pt`` layouts), and the partition fields when
    the file records them (``.pt`` sets are taken as already expanded).
    """
    if os.path.isdir(path):
        path = os.path.join(path, "images.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no condensed set at {path}")
    if path.endswith(".npz"):
        return load_npz(path)
    if not path.endswith(".pt"):
        raise ValueError(f"{path}: expected a .npz or .pt file, or a folder with images.pt")
    value = torch_format.load(path)
    if isinstance(value, dict) and "data" in value:           # DC-BENCH
        try:
            images, labels = value["data"][-1][:2]
        except (TypeError, ValueError, IndexError):
            raise ValueError(f"{path}: expected {{'data': [[images, labels], ...]}} as DC-BENCH "
                             f"writes") from None
    elif isinstance(value, np.ndarray):                          # DD-Ranking
        labels_path = os.path.join(os.path.dirname(path), "labels.pt")
        if not os.path.exists(labels_path):
            raise FileNotFoundError(f"{path} holds images only; labels.pt must lie beside it")
        images, labels = value, torch_format.load(labels_path)
    else:
        raise ValueError(f"{path}: neither DC-BENCH's {{'data': ...}} nor a DD-Ranking tensor")
    images, labels = np.asarray(images), np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{path}: labels of shape {labels.shape} are soft labels; the "
                         f"evaluation protocol here trains with hard labels")
    if images.ndim != 4 or len(labels) != len(images):
        raise ValueError(f"{path}: expected images (N, C, H, W) and labels (N,), got "
                         f"{images.shape} and {labels.shape}")
    return {"images_normalized": images.transpose(0, 2, 3, 1).astype(np.float32),
            "labels": labels.astype(np.int32), "partition_expand": False}


def check_set(saved: dict, path: str, num_classes: int) -> np.ndarray:
    """Refuse, with one sentence naming ``path``, a loaded set (``load_set``) that cannot be a
    condensed image set of ``num_classes`` classes: no images, non-float or non-finite values,
    [0, 1] pixels that are not in [0, 1] (0..255 values, say), labels that are not whole numbers
    in [0, num_classes), or a recorded partition that cannot cut its images. Returns the labels
    as int32."""
    normalized = "images_normalized" in saved
    images = saved["images_normalized"] if normalized else saved["images"]
    labels = np.asarray(saved["labels"])
    if images.shape[0] == 0:
        raise ValueError(f"{path} holds no images")
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"{path}: images are {images.dtype}; a set holds float images ([0, 1] "
                         f"pixels in .npz; divide 0..255 values by 255)")
    bad = int(np.size(images) - np.count_nonzero(np.isfinite(images)))
    if bad:
        raise ValueError(f"{path}: {bad} image values are NaN or infinite")
    if "images" in saved:
        low, high = float(saved["images"].min()), float(saved["images"].max())
        if low < -1e-3 or high > 1 + 1e-3:
            hint = ("; they look like 0..255 values: divide them by 255" if high > 2 else "")
            raise ValueError(f"{path}: 'images' must be pixels in [0, 1], found "
                             f"[{low:.4g}, {high:.4g}]{hint}")
    if not np.issubdtype(labels.dtype, np.integer):
        if not (np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels))):
            raise ValueError(f"{path}: labels must be whole class numbers, got {labels.dtype} "
                             f"values such as {labels.ravel()[:3].tolist()}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"{path}: labels lie in [{labels.min():.0f}, {labels.max():.0f}], "
                         f"outside the {num_classes} classes 0..{num_classes - 1} of the dataset")
    _check_recorded_partition(saved, path, images.shape[1:3])
    return labels.astype(np.int32)


def _check_recorded_partition(saved: dict, path: str, image_hw) -> None:
    if not bool(saved.get("partition_expand", False)):
        return
    scheme = str(saved.get("partition_scheme", "uniform"))
    factor, ratio = int(saved.get("partition_factor", 2)), float(saved.get("partition_ratio", 0.4))
    if scheme not in partition.SCHEMES:
        raise ValueError(f"{path}: the recorded partition scheme {scheme!r} is none of "
                         f"{', '.join(partition.SCHEMES)}")
    if not 1 <= factor <= min(image_hw) or not 0 < ratio < 1:
        raise ValueError(f"{path}: the recorded partition (factor {factor}, ratio {ratio}) cannot "
                         f"cut {image_hw[0]}x{image_hw[1]} images; evaluate with --no-expand or "
                         f"fix the file")


__all__ = ["FORMATS", "check_set", "export_npz", "load_npz", "expanded_set", "write_png_folders",
           "dcbench_name", "export_set", "load_set"]
