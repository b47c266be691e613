"""The backend policy: the few choices that depend on the kind of device, made in one place.

Every choice here changes speed, never values (each is tested against its alternative):

- ``chunk``: images per network call. On CPU a batch's activations stream through main memory
  between every layer while a chunk of 16 stays in cache, so networks run over chunks
  (``idm_jax.accel.microbatch``); accelerators want whole batches to stay busy.
- ``cpu_kernels``: the rewrites of ``idm_jax.accel.ops`` (convolution gradients as matrix products,
  vmap over stacked kernels as a loop, DSA vmapped over keys as a loop). They win on CPU only.
- ``remat``: when the chunk was chosen to fit the device's memory, or on CPU when keeping every
  chunk's activations would not fit the host's (``idm_jax.accel.memory``), chunked calls under an
  outer gradient recompute their activations in the backward pass.
- ``vmap_models``: several models trained at once (the two queue trainees, the evaluation
  models) as one vmapped program (accelerators) or one after another (CPU, where one model
  already fills the cores and vmapping turns skipped padding chunks into computed ones).

The policy is resolved once, at the edge: by the engine when it is built (``make_engine``) and
by the evaluation's entry point (``evaluate_synset``). It reaches the maths as arguments: the
networks get their convolution as a building block (``Policy.conv_op``), DSA and the model
trainers get plain arguments whose defaults are the plain (accelerator) forms; nothing below
the edge asks JAX which device it runs on. BENCHMARKS.md has the measurements behind each
choice.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import functools

import jax
from jax import lax

from idm_jax import augment
from idm_jax.accel import ops

# Images per network call on CPU when the config asks for the automatic choice (best of 8-32).
CPU_CHUNK = 16


@dataclasses.dataclass(frozen=True)
class Policy:
    """How one run uses its device kind. Frozen and hashable (usable as a static argument)."""

    platform: str          # jax.default_backend() it was resolved for: "cpu", "gpu", "tpu"
    chunk: int             # images per network call; 0: whole batches
    cpu_kernels: bool      # use the CPU rewrites of idm_jax.accel.ops
    vmap_models: bool      # train several models as one vmapped axis
    remat: bool = False    # memory is short: chunks recompute their activations in the
                           # backward pass instead of keeping every chunk's (idm_jax.accel.memory)

    @property
    def conv_op(self):
        """The convolution the networks are built with (``models.get_model(conv_op=...)``)."""
        return ops.conv2d if self.cpu_kernels else lax.conv_general_dilated

    @property
    def augment(self):
        """DSA as the maths calls it, ``(key, images, strategy, siamese) -> images``: keys
        batched by a vmap run one after another on CPU (``augment.dsa(loop_over_keys=True)``)."""
        return functools.partial(augment.dsa, loop_over_keys=self.cpu_kernels)

    @property
    def map_models(self):
        """How several models train at once: ``map_models(f)(*stacked)`` is ``jax.vmap(f)``
        (accelerators) or the same calls one after another (``sequential``, CPU)."""
        return jax.vmap if self.vmap_models else sequential

    def announcement(self) -> Optional[str]:
        """What a user should know of this policy before a run starts, or None."""
        if self.platform != "cpu":
            calls = (f"chunks of {self.chunk} images, to fit the memory budget"
                     if self.chunk else "whole batches")
            return f"network calls on {self.platform}: {calls}"
        if self.remat:
            return ("memory: the synthetic activations would not fit this host, so the backward "
                    "pass recomputes them (same values, slower; --memory_budget_gb sets the "
                    "budget)")
        return None


def sequential(fn):
    """``jax.vmap(fn)``'s values, computed one leading-axis entry after another (``lax.map``)."""
    def mapped(*args):
        return jax.lax.map(lambda a: fn(*a), args)
    return mapped


def resolve(microbatch: int = -1, platform: Optional[str] = None) -> Policy:
    """The policy for ``platform`` (default: JAX's default backend).

    Args:
      microbatch: the config field: -1 automatic (``CPU_CHUNK`` on CPU, whole batches
        elsewhere), 0 whole batches, n > 0 chunks of at most n images.
      platform: "cpu", "gpu", "tpu", ...; None asks JAX.
    """
    if microbatch < -1:
        raise ValueError(f"microbatch must be -1 (automatic), 0 (whole batches) or a chunk size "
                         f">= 1, got {microbatch}")
    platform = platform or jax.default_backend()
    on_cpu = platform == "cpu"
    chunk = (CPU_CHUNK if on_cpu else 0) if microbatch < 0 else microbatch
    return Policy(platform=platform, chunk=chunk, cpu_kernels=on_cpu, vmap_models=not on_cpu)


__all__ = ["CPU_CHUNK", "Policy", "sequential", "resolve"]
