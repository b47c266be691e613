"""The files a run writes: its metrics log, pictures of the synthetic set, and the exported set.

Pure host-side code (NumPy, Pillow, tqdm); ``idm_jax.run`` decides when each is written.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import jax
import numpy as np

from idm_jax import checkpoint, engine
from idm_jax.config import Config


def save_grid(path: str, images_01: np.ndarray, num_classes: int) -> None:
    """PNG of the synthetic set, one row per class: images (K*ipc, H, W, C) in [0,1]."""
    from PIL import Image  # only needed for this output

    n, h, w, c = images_01.shape
    ipc = n // num_classes
    zoom = max(1, 32 // h)                        # small images (digits) are hard to see
    pixels = (np.clip(images_01, 0, 1) * 255).round().astype(np.uint8)
    pixels = pixels.repeat(zoom, axis=1).repeat(zoom, axis=2)
    h, w, pad = h * zoom, w * zoom, 2
    grid = np.full((num_classes * (h + pad) + pad, ipc * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        row, col = divmod(i, ipc)
        top, left = pad + row * (h + pad), pad + col * (w + pad)
        grid[top:top + h, left:left + w] = pixels[i]
    mode = "L" if c == 1 else "RGB"
    Image.fromarray(grid[..., 0] if c == 1 else grid, mode).save(path)


class MetricsLog:
    def __init__(self, path: str):
        self._file = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()


def device_description() -> str:
    devices = jax.devices()
    return f"{len(devices)} x {devices[0].device_kind} ({jax.default_backend()})"


def pixel_converter(config: Config, mean: np.ndarray, std: np.ndarray) -> Callable:
    """images as stored (K*ipc, H, W, C) -> [0,1] pixels for pictures and export."""
    def to_pixels(images):
        if config.normalize_train:
            return np.clip(images * std + mean, 0, 1)
        return np.clip(images, 0, 1)    # the ImageNet quirk: stored images are [0,1] pixels
    return to_pixels


def progress_bar(config: Config, start: int, hidden: bool):
    """A tqdm bar over the run's iterations (with rate and ETA), or None when ``hidden``."""
    if hidden:
        return None
    from tqdm import tqdm
    return tqdm(total=config.iterations, initial=start, unit="it", dynamic_ncols=True,
                desc=f"{config.dataset} ipc{config.ipc}")


def export_set(workdir: str, images: np.ndarray, real, config: Config,
               to_pixels: Callable) -> None:
    """``synthetic.npz`` and ``synthetic.png`` of the stored set ``images`` (normalised)."""
    labels = np.asarray(engine.synthetic_labels(real.num_classes, config.ipc))
    # With the ImageNet quirk the stored images are already [0,1] pixels.
    mean, std = ((real.mean, real.std) if config.normalize_train
                 else (np.zeros_like(real.mean), np.ones_like(real.std)))
    checkpoint.export_npz(os.path.join(workdir, "synthetic.npz"), images, labels, mean, std,
                          partition_expand=config.partition_expand,
                          partition_factor=config.partition_factor,
                          partition_scheme=config.partition,
                          partition_ratio=config.partition_ratio,
                          normalized=config.normalize_train)
    save_grid(os.path.join(workdir, "synthetic.png"), to_pixels(images), real.num_classes)


__all__ = ["save_grid", "MetricsLog", "device_description", "pixel_converter", "progress_bar",
           "export_set"]
