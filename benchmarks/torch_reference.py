"""The official code's network work in PyTorch, timed on this machine, as a baseline.

The issue's CPU goal compares our iteration with the official PyTorch code on the same machine.
That code is not installable here (no network beyond package registries), so this module
rebuilds the part of it that does the work: the same ConvNet-3 (conv 3x3 / GroupNorm(C, C) /
ReLU / AvgPool2d(2) x 3, linear classifier, PyTorch default init, NCHW) with the same
optimisers, batch sizes and passes per iteration (reference sections 2.5-2.7 and 6):

* matching, per class: a forward of 256 real images without gradient; partition-and-expand of
  the class's ``ipc`` synthetic images to ``4 * ipc`` (quadrants, bilinear upsampling); an
  embedding forward *and* a separate logits forward of the expanded images, as the official
  code does; the MMD + CE loss; backward; one SGD step (momentum 0.5) on the images;
* queue training: ``fetch_net_num`` models x ``model_train_steps`` SGD steps (lr 0.01, momentum
  0.9, weight decay 5e-4) on 256 images gathered at random from a 50,000-image tensor;
* evaluation: one epoch of the evaluation trainer over ``4 * ipc * classes`` images in batches
  of 256.

Not rebuilt: DSA augmentation (the official code applies it to the real and synthetic batches
in matching and to every evaluation batch), the data loader and logging. They only add time to
PyTorch's side, so the figures here are lower bounds of the official code's time. Inputs are
random tensors of CIFAR-10's shapes (speed does not depend on the values).

Usage (PyTorch is not a dependency of idm-jax; install it into the same environment)::

    pip install torch --index-url https://download.pytorch.org/whl/cpu
    python -m benchmarks.torch_reference [--iters 2] [--channels_last] [--device cuda]

``--device auto`` (the default) runs on the GPU when PyTorch sees one, else on the CPU, and the
record names the device, so a figure is never read as the other device's.

Prints one table row (markdown) and one JSON line; ``--json FILE`` also appends the JSON line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Optional, Sequence

from benchmarks.common import load_average, progress, report


def _import_torch():
    try:
        import torch
    except ImportError:
        sys.exit("benchmarks.torch_reference needs PyTorch, which idm-jax does not install: "
                 "pip install torch --index-url https://download.pytorch.org/whl/cpu")
    return torch


def convnet3(torch, channels: int = 3, width: int = 128, num_classes: int = 10, hw: int = 32):
    """ConvNet-3 of the official ``networks.py`` (instancenorm = GroupNorm(width, width))."""
    nn = torch.nn
    layers = []
    for d in range(3):
        layers += [nn.Conv2d(channels if d == 0 else width, width, 3, padding=1),
                   nn.GroupNorm(width, width, affine=True), nn.ReLU(inplace=True),
                   nn.AvgPool2d(2, 2)]
    features = nn.Sequential(*layers, nn.Flatten())
    return features, nn.Linear(width * (hw // 8) ** 2, num_classes)


def partition_expand(torch, images):
    """(n, C, H, W) -> (4n, C, H, W): 2x2 quadrants, each bilinearly upsampled to H x W."""
    n, c, h, w = images.shape
    parts = [images[:, :, i * h // 2:(i + 1) * h // 2, j * w // 2:(j + 1) * w // 2]
             for i in range(2) for j in range(2)]
    return torch.nn.functional.interpolate(torch.cat(parts), size=(h, w), mode="bilinear",
                                           align_corners=False)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=2, help="timed iterations (min reported)")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch_real", type=int, default=256)
    parser.add_argument("--trainees", type=int, default=2, help="fetch_net_num")
    parser.add_argument("--train_steps", type=int, default=10, help="model_train_steps")
    parser.add_argument("--channels_last", action="store_true",
                        help="NHWC memory format (not what the official code does)")
    parser.add_argument("--threads", type=int, default=0, help="0: one per core")
    parser.add_argument("--device", default="auto",
                        help="auto (cuda when PyTorch sees a GPU, else cpu), cpu, cuda, cuda:N")
    parser.add_argument("--json", default=None, help="append the JSON record to this file")
    return parser


def _workload(torch, args, device, fmt) -> dict:
    """The three timed parts of the official code's work, each a function of no arguments:
    ``matching`` (one iteration, every class), ``queue`` (every trainee's steps) and
    ``eval_epoch`` (one epoch of the evaluation trainer)."""
    F = torch.nn.functional

    def model():
        features, head = convnet3(torch, num_classes=args.classes)
        return features.to(device, memory_format=fmt), head.to(device)

    def sgd(params):
        return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step(opt, loss):
        opt.zero_grad()
        loss.backward()
        opt.step()

    pool = torch.randn(50000, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    pool_labels = torch.randint(0, args.classes, (50000,), device=device)
    syn = torch.randn(args.classes * args.ipc, 3, 32, 32, device=device, requires_grad=True)
    syn_opt = torch.optim.SGD([syn], lr=0.2, momentum=0.5)
    features, head = model()
    trainees = [model() for _ in range(args.trainees)]
    trainee_opts = [sgd(list(f.parameters()) + list(h.parameters())) for f, h in trainees]
    eval_features, eval_head = model()
    eval_opt = sgd(list(eval_features.parameters()) + list(eval_head.parameters()))
    eval_images = torch.randn(4 * args.ipc * args.classes, 3, 32, 32, device=device).contiguous(
        memory_format=fmt)
    eval_labels = torch.arange(args.classes, device=device).repeat_interleave(4 * args.ipc)

    def matching():
        for c in range(args.classes):
            real = pool[torch.randint(0, 50000, (args.batch_real,), device=device)]
            with torch.no_grad():
                real_mean = features(real).mean(0)
            expanded = partition_expand(torch, syn[c * args.ipc:(c + 1) * args.ipc])
            expanded = expanded.contiguous(memory_format=fmt)
            syn_mean = features(expanded).mean(0)
            logits = head(features(expanded))      # the official code's second forward
            target = torch.full((expanded.shape[0],), c, device=device)
            step(syn_opt, ((real_mean - syn_mean) ** 2).sum()
                 + 0.5 * F.cross_entropy(logits, target))

    def queue():
        for (trainee, trainee_head), opt in zip(trainees, trainee_opts):
            for _ in range(args.train_steps):
                idx = torch.randint(0, 50000, (args.batch_real,), device=device)
                step(opt, F.cross_entropy(trainee_head(trainee(pool[idx])), pool_labels[idx]))

    def eval_epoch():
        order = torch.randperm(eval_images.shape[0], device=device)
        for start in range(0, order.numel(), 256):
            idx = order[start:start + 256]
            step(eval_opt, F.cross_entropy(eval_head(eval_features(eval_images[idx])),
                                           eval_labels[idx]))

    return {"matching": matching, "queue": queue, "eval_epoch": eval_epoch}


def _timed(fn, name: str, iters: int, barrier) -> tuple[float, float]:
    """(min, median) seconds of ``iters`` calls of ``fn`` after one warm-up call (oneDNN and
    cuDNN pick and cache their kernels on the first)."""
    fn()
    barrier()
    times = []
    for i in range(iters):
        start = time.perf_counter()
        fn()
        barrier()
        times.append(time.perf_counter() - start)
        progress(f"{name} {i + 1}/{iters}: {times[-1]:.2f} s")
    return min(times), statistics.median(times)


def _row(r: dict) -> str:
    return (f"| {r['date']} | {r['torch']} | {r['device_name']} | "
            f"{'NHWC' if r['channels_last'] else 'NCHW'} | {r['iteration_s']:.2f} s | "
            f"{r['matching_s']:.2f} s | {r['queue_s']:.2f} s ({r['queue_step_s']:.3f} s) | "
            f"{r['eval_epoch_s']:.2f} s | {r['load_before']} |")


HEADER = ("| date | torch | device | format | iteration | matching | queue (per step) "
          "| eval epoch | load |\n|---|---|---|---|---|---|---|---|---|")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = _parser().parse_args(argv)
    torch = _import_torch()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads or os.cpu_count())
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    # Work on a GPU is queued: without a barrier a timing would measure the launches only.
    barrier = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    work = _workload(torch, args, device, fmt)
    load_before = load_average()
    match_s, match_med = _timed(work["matching"], "matching", args.iters, barrier)
    queue_s, queue_med = _timed(work["queue"], "queue training", args.iters, barrier)
    eval_s, _ = _timed(work["eval_epoch"], "evaluation epoch", args.iters, barrier)
    record = {
        "benchmark": "torch_reference", "torch": torch.__version__, "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else "cpu"),
        "torch_threads": torch.get_num_threads(), "channels_last": args.channels_last,
        "ipc": args.ipc, "classes": args.classes, "iters": args.iters,
        "matching_s": match_s, "matching_median_s": match_med,
        "queue_s": queue_s, "queue_median_s": queue_med,
        "queue_step_s": queue_s / (args.trainees * args.train_steps),
        "iteration_s": match_s + queue_s, "eval_epoch_s": eval_s,
        "load_before": load_before, "load_after": load_average(),
    }
    return report(record, "benchmarks.torch_reference", argv, HEADER, _row, args.json)


if __name__ == "__main__":
    main()
