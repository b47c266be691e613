"""The files a run writes: its metrics log, pictures of the synthetic set, and the exported set.

Pure host-side code (NumPy, Pillow, tqdm); ``idm_jax.runs.run`` decides when each is written.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from typing import Callable

import jax
import numpy as np

from idm_jax import engine
from idm_jax.runs import export
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


def processor() -> dict:
    """The host's processor model, its core count and the flags that change CPU speed, so that
    a figure says which machine made it (CPU times differ up to 2x between processors)."""
    cpu, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu in ("", platform.machine()):
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    flags = sorted(present & {"avx2", "avx512f", "avx512_bf16", "amx_tile"})
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_flags": flags, "cores": os.cpu_count()}


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


def evaluation_bar(num_models: int, epochs: int, model: str, hidden: bool = False):
    """A tqdm bar over an evaluation's model-epochs (``epochs`` as the official loop counts
    them: 0..epochs), with rate and ETA, and the ``progress`` function that moves it
    (``evaluation.evaluate_synset``); (None, None) when ``hidden``."""
    if hidden:
        return None, None
    from tqdm import tqdm
    bar = tqdm(total=num_models * (epochs + 1), unit="epoch", dynamic_ncols=True,
               desc=f"evaluating {num_models} x {model}", leave=False)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)
    return bar, progress


def export_set(workdir: str, images: np.ndarray, real, config: Config, to_pixels: Callable,
               class_names, iteration: int) -> None:
    """The final set ``images`` (normalised, as stored) in the layouts ``config.exports`` names
    (``idm_jax.runs.export``), and ``synthetic.png``."""
    labels = np.asarray(engine.synthetic_labels(real.num_classes, config.ipc))
    export.export_set(
        workdir, images, labels, np.asarray(real.mean), np.asarray(real.std),
        dataset=config.dataset, class_names=class_names, model=config.model, ipc=config.ipc,
        partition_expand=config.partition_expand, partition_scheme=config.partition,
        partition_factor=config.partition_factor, partition_ratio=config.partition_ratio,
        normalized=config.normalize_train, iteration=iteration, code_version=code_version(),
        formats=config.export_formats)
    save_grid(os.path.join(workdir, "synthetic.png"), to_pixels(images), real.num_classes)


def code_version() -> str:
    """The git commit of this checkout (``+dirty`` with uncommitted changes), else the installed
    package version."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"],
                                capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "idm_jax"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return commit.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib import metadata
        return "idm-jax " + metadata.version("idm-jax")
    except Exception:
        return "unknown"


def read_metrics(workdir: str) -> tuple[list[dict], list[dict]]:
    """The iteration records and the evaluation records of ``workdir/metrics.jsonl``."""
    steps, evals = [], []
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                (evals if record.get("event") == "eval" else steps).append(record)
    return steps, evals


def logged_seconds(workdir: str) -> float:
    """Condensation seconds over every session of the run (each iteration is logged once)."""
    steps, _ = read_metrics(workdir)
    return _seconds(steps)


def _seconds(steps: list[dict]) -> float:
    return float(sum(r.get("seconds", 0.0) for r in steps))


def save_metrics_plot(workdir: str, path: str | None = None) -> str | None:
    """``metrics.png``: the loss terms, the extractor's accuracy and the evaluations of a run
    against the iteration. Returns the path, or None when nothing was logged."""
    steps, evals = read_metrics(workdir)
    if not steps:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = np.array([r["iteration"] for r in steps])
    terms = [k for k in ("loss", "mmd", "ce", "moment") if k in steps[0]]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for key in terms:
        axes[0].plot(it, [r[key] for r in steps], label=key, lw=1)
    axes[0].set(xlabel="iteration", ylabel="loss (sum over classes)", title="matching loss")
    if all(r.get("loss", 1) > 0 for r in steps):
        axes[0].set_yscale("log")
    axes[0].legend()
    if "extractor_acc" in steps[0]:
        axes[1].plot(it, [r["extractor_acc"] for r in steps], lw=1)
    axes[1].set(xlabel="iteration", ylabel="%", title="extractor training accuracy")
    if evals:
        axes[2].errorbar([e["iteration"] for e in evals], [e["mean"] for e in evals],
                         yerr=[e["std"] for e in evals], fmt="o-", capsize=3)
    axes[2].set(xlabel="iteration", ylabel="test accuracy %", title="evaluations")
    fig.suptitle(os.path.basename(os.path.abspath(workdir)))
    fig.tight_layout()
    path = path or os.path.join(workdir, "metrics.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def saved_steps(directory: str) -> list[int]:
    """The iterations of the checkpoints in a checkpoint folder, ascending ([] when none)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def summarize(workdir: str) -> dict:
    """Where a run stands, from its files alone (nothing is locked or changed): target and
    logged iterations, who runs it now, its checkpoints (and damaged ones set aside), seconds
    spent, the last loss and evaluations, and the final result if there is one."""
    from idm_jax.runs import workdir as workdir_lib

    def read_json(name):
        try:
            with open(os.path.join(workdir, name)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    config, results = read_json("config.json") or {}, read_json("results.json")
    steps, evals = read_metrics(workdir)
    return {
        "workdir": workdir, "dataset": config.get("dataset"), "ipc": config.get("ipc"),
        "target_iterations": config.get("iterations"),
        "logged_iterations": (steps[-1]["iteration"] + 1) if steps else 0,
        "running": workdir_lib.holder(workdir),
        "checkpoints": saved_steps(os.path.join(workdir, "checkpoints")),
        "damaged": saved_steps(os.path.join(workdir, "checkpoints-damaged")),
        "sessions": len(workdir_lib.read_sessions(workdir)),
        "condense_seconds": _seconds(steps),
        "last_loss": steps[-1].get("loss") if steps else None,
        "evaluations": [(e["iteration"], e["mean"], e["std"]) for e in evals],
        "final": None if results is None else (results["mean"], results["std"])}


__all__ = ["save_grid", "MetricsLog", "device_description", "pixel_converter", "progress_bar",
           "evaluation_bar", "export_set", "code_version", "processor", "read_metrics",
           "logged_seconds", "save_metrics_plot", "saved_steps", "summarize"]
