"""How many images fit in one network call: the memory-aware chunk, and remat on CPU.

Whole batches keep an accelerator busy, but the paper's biggest batches do not fit: at
``cifar10-ipc1`` the real batch is 10 x 5000 images in one forward (about 26 GB for the first
convolution's output alone), and at TinyImageNet IPC 50 the synthetic batch is 200 x 50 x 4
views at 64x64 whose activations are kept for the backward pass. The rule here:

  budget    = ``memory_budget_gb`` (or 90 % of the device's ``bytes_limit``) minus what stays
              resident (the real images, the queue with its momenta, the synthetic state);
  per image = the bytes of every intermediate value of one image's forward pass (an upper
              bound on what a backward pass keeps, from the traced program);
  chunk     = 0 (whole batches) when the largest batch fits the budget, else
              ``budget // per image`` images per call.

Chunked calls give the same values as whole batches up to float summation order
(``idm_jax.accel.microbatch``). Under an outer gradient (the synthetic images) a chunked call is
rematerialised (``jax.checkpoint``), so its backward pass holds one chunk's activations at a time,
not all of them.

On CPU the chunk stays cache-sized (``backend.CPU_CHUNK``), but the synthetic gradient keeps
every chunk's activations for the backward pass: K x ipc x pieces images, which at K = 1000
classes is far beyond a host's memory. ``cpu_needs_remat`` turns on the rematerialisation when
those, the resident state and the real batch's float copies would not fit ``memory_budget_gb``
(or 90 % of the host's memory); values do not change, the synthetic forward runs twice.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import jax
import numpy as np

from idm_jax import validate
from idm_jax.config import Config

DEVICE_FRACTION = 0.9        # of bytes_limit, leaving room for XLA's own buffers


def device_memory_bytes(device=None) -> Optional[int]:
    """The memory XLA may use on ``device`` (default: the first), or None when it is not told
    (CPU)."""
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:          # some backends do not implement it
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def host_memory_bytes() -> Optional[int]:
    """This host's physical memory, or the cgroup's limit when that is lower; None if unknown."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        total = None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            total = min(int(limit), total) if total else int(limit)
    except OSError:
        pass
    return total


def _inner_jaxprs(params: dict) -> list:
    """The sub-programs an equation calls (jit, custom_vjp, ...), open or closed."""
    found = []
    for value in params.values():
        if hasattr(value, "eqns"):
            found.append(value)
        elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
            found.append(value.jaxpr)
    return found


def _jaxpr_bytes(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        inner = _inner_jaxprs(eqn.params)
        if inner:              # a call: count what runs inside it
            total += sum(_jaxpr_bytes(j) for j in inner)
            continue
        for var in eqn.outvars:
            aval = var.aval
            if hasattr(aval, "shape") and hasattr(aval, "dtype"):
                total += int(np.prod(aval.shape, dtype=np.int64)) * np.dtype(aval.dtype).itemsize
    return total


def activation_bytes_per_image(apply: Callable, params: Any, image_shape) -> int:
    """Bytes of all intermediate values of ``apply(params, one image)``: (1, H, W, C) in."""
    x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), np.float32)
    return _jaxpr_bytes(jax.make_jaxpr(apply)(params, x).jaxpr)


def residual_bytes_per_image(apply: Callable, params: Any, image_shape) -> int:
    """Bytes the backward pass of ``apply`` (gradient w.r.t. the images) keeps per image: its
    residuals for a batch of 2 minus those for 1, from the traced ``jax.vjp`` (nothing runs)."""
    def residuals(n):
        x = jax.ShapeDtypeStruct((n,) + tuple(image_shape), np.float32)
        vjp_fn = jax.eval_shape(lambda p, y: jax.vjp(lambda z: apply(p, z), y)[1], params, x)
        return tree_bytes(vjp_fn)
    return residuals(2) - residuals(1)


def tree_bytes(tree) -> int:
    return sum(int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
               for leaf in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """The sizes the rule used (bytes) and its choice."""

    budget: int              # for network calls, after the resident state
    resident: int            # real images + queue (params, momenta) + synthetic state
    per_image: int           # one image's forward activations
    largest_batch: int       # images in the biggest network call of an iteration
    chunk: int               # 0: whole batches; else images per call

    @property
    def peak(self) -> int:
        """Resident bytes plus the largest call as planned."""
        return self.resident + (self.chunk or self.largest_batch) * self.per_image


def choose_chunk(largest_batch: int, per_image: int, budget: int) -> int:
    """0 when ``largest_batch`` images fit ``budget`` bytes, else the images that do (>= 1)."""
    if largest_batch * per_image <= budget:
        return 0
    return max(1, budget // max(per_image, 1))


def largest_batch(config: Config, num_classes: int) -> int:
    """Images in the biggest single network call of one iteration: every class's real batch,
    every class's expanded synthetic views, or the queue trainees' batch."""
    trainees = config.fetch_net_num if config.fetch_net_num else 1
    return max(num_classes * config.batch_real, num_classes * config.ipc * config.pieces,
               trainees * config.trained_bs)


def resident_bytes(config: Config, num_classes: int, image_shape, max_per_class: int,
                   params_bytes: int) -> int:
    """What stays on the device all run: the real images (uint8, every class padded to the
    largest), the queue (params and their SGD momenta), the synthetic images and momentum."""
    pixels = int(np.prod(image_shape))
    real = num_classes * max_per_class * pixels
    queue = config.net_num * 2 * params_bytes
    synthetic = 2 * num_classes * config.ipc * pixels * 4
    return real + queue + synthetic


def budget_bytes(config: Config, device_bytes: Optional[int]) -> Optional[int]:
    """The bytes a run may use: ``config.memory_budget_gb`` when set, else ``DEVICE_FRACTION`` of
    ``device_bytes`` (a device's limit or a host's memory); None when neither is known."""
    if config.memory_budget_gb > 0:
        return int(config.memory_budget_gb * 2 ** 30)
    return None if device_bytes is None else int(DEVICE_FRACTION * device_bytes)


def real_batch_bytes(config: Config, num_classes: int, image_shape, max_per_class: int) -> int:
    """One iteration's real batch as float32: every class's gathered and augmented copies."""
    batch = min(config.batch_real, max_per_class)
    return 2 * num_classes * batch * int(np.prod(image_shape)) * 4


def plan(config: Config, num_classes: int, image_shape, max_per_class: int, apply: Callable,
         params: Any, device_bytes: Optional[int]) -> MemoryPlan:
    """The chunk for a run of ``config`` on a device of ``device_bytes`` (None: unknown, whole
    batches); ``config.memory_budget_gb`` > 0 replaces the device's figure."""
    per_image = activation_bytes_per_image(apply, params, image_shape)
    resident = resident_bytes(config, num_classes, image_shape, max_per_class,
                              tree_bytes(params))
    batch = largest_batch(config, num_classes)
    total = budget_bytes(config, device_bytes)
    if total is None:
        return MemoryPlan(0, resident, per_image, batch, 0)
    budget = max(total - resident, 0)
    if budget < per_image:
        raise validate.InvalidRun(
            f"--memory_budget_gb: the run needs {resident / 2 ** 30:.1f} GiB resident and "
            f"{per_image / 2 ** 20:.1f} MiB per image in flight, more than the "
            f"{total / 2 ** 30:.1f} GiB budget; set --memory_budget_gb higher, or use a device "
            f"with more memory")
    return MemoryPlan(budget, resident, per_image, batch, choose_chunk(batch, per_image, budget))


def cpu_needs_remat(config: Config, num_classes: int, image_shape, max_per_class: int,
                    apply: Callable, params: Any, host_bytes: Optional[int]) -> bool:
    """Whether a CPU run must recompute its synthetic chunks' activations in the backward pass.

    True when the kept residuals (every class's expanded views, ``residual_bytes_per_image``
    each), the resident state and the real batch (its gathered and augmented float32 copies)
    exceed ``config.memory_budget_gb`` or ``DEVICE_FRACTION`` of ``host_bytes``; False when the
    budget is unknown.
    """
    total = budget_bytes(config, host_bytes)
    if total is None:
        return False
    resident = resident_bytes(config, num_classes, image_shape, max_per_class,
                              tree_bytes(params))
    real_batch = real_batch_bytes(config, num_classes, image_shape, max_per_class)
    kept = num_classes * config.ipc * config.pieces * residual_bytes_per_image(
        apply, params, image_shape)
    return resident + real_batch + kept > total


def describe(p: MemoryPlan) -> str:
    calls = "whole batches" if p.chunk == 0 else f"chunks of {p.chunk} images"
    return (f"memory plan: {calls} (largest call {p.largest_batch} images x "
            f"{p.per_image / 2 ** 20:.2f} MiB; resident {p.resident / 2 ** 30:.2f} GiB; budget "
            f"{p.budget / 2 ** 30:.1f} GiB; planned peak {p.peak / 2 ** 30:.1f} GiB)")


__all__ = ["DEVICE_FRACTION", "device_memory_bytes", "host_memory_bytes", "cpu_needs_remat",
           "residual_bytes_per_image", "activation_bytes_per_image", "tree_bytes", "budget_bytes",
           "real_batch_bytes",
           "MemoryPlan", "choose_chunk", "largest_batch", "resident_bytes", "plan", "describe"]
