"""Running a per-sample network over a batch in fixed-size chunks (micro-batches).

Every network IDM condenses with normalises per sample (instance norm), so its outputs for a
batch are its outputs for each chunk of that batch, and the gradient of a sum over the batch is
the sum of the chunks' gradients. The values are the same as for the whole batch; only the order
of float32 additions changes.

Why chunk: on CPU the activations of a whole batch (ConvNet-3, 256 images at 32x32: 128 MiB per
first-layer tensor) stream through main memory between every convolution, normalisation and
pooling, while a chunk of 8 to 32 images stays in cache (timings: BENCHMARKS.md, "Where the time
goes").
Accelerators want the opposite (large batches keep them busy), so chunking is for CPU; the
backend policy (``idm_jax.accel.backend``) decides the chunk size.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def chunk_size(batch: int, chunk: int) -> int:
    """The largest divisor of ``batch`` that is at most ``chunk`` (``batch`` itself for 0).

    Chunks have one static size so that the loop body compiles once.
    """
    if chunk <= 0 or chunk >= batch:
        return batch
    return max(d for d in range(1, chunk + 1) if batch % d == 0)


def apply_in_chunks(fn: Callable[[jax.Array], Any], images: jax.Array, chunk: int,
                    remat: bool = False) -> Any:
    """``fn(images)`` computed chunk by chunk along the leading axis with ``lax.map``.

    ``fn`` maps an (n, ...) batch to a pytree of (n, ...) arrays, each row depending only on its
    own input row. Differentiable (the backward pass runs chunk by chunk too). Under a gradient
    the backward pass keeps every chunk's activations, unless ``remat``: then each chunk's
    forward is recomputed in the backward pass (``jax.checkpoint``), so only one chunk's
    activations are alive at a time (memory for compute: about one more forward pass).
    """
    batch = images.shape[0]
    size = chunk_size(batch, chunk)
    if size == batch:
        return fn(images)
    if remat:
        fn = jax.checkpoint(fn)
    out = jax.lax.map(fn, images.reshape((batch // size, size) + images.shape[1:]))
    return jax.tree.map(lambda y: y.reshape((batch,) + y.shape[2:]), out)


def value_and_grad_in_chunks(loss_fn: Callable, params: Any, inputs: Any, chunk: int,
                             row_valid: jax.Array | None = None):
    """``jax.value_and_grad(loss_fn, has_aux=True)(params, inputs)`` for a loss that sums over
    rows, accumulated chunk by chunk with ``lax.scan``.

    Args:
      loss_fn: ``(params, inputs) -> (loss, aux)``, with ``loss`` a sum of per-row terms over the
        rows of ``inputs`` and ``aux`` a pytree of per-row arrays (n, ...).
      inputs: a pytree of arrays sharing the leading (row) axis n.
      chunk: rows per chunk (the largest divisor of n not above it; 0: all at once).
      row_valid: optional (n,) bool. A chunk with no valid row is skipped (``lax.cond``): it
        must contribute zero loss and gradient (padding rows weighted 0), and its aux is zeros.

    Returns ``((loss, aux), grads)`` as ``jax.value_and_grad`` would: the summed loss, the rows'
    aux in order, and the summed gradient. Each chunk's forward and backward pass run back to
    back, so the chunk's activations are still in cache when the backward pass reads them.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    batch = jax.tree.leaves(inputs)[0].shape[0]
    size = chunk_size(batch, chunk)
    if size == batch:
        return grad_fn(params, inputs)
    chunks = jax.tree.map(lambda x: x.reshape((batch // size, size) + x.shape[1:]), inputs)

    zeros = jax.tree.map(jnp.zeros_like, params)

    def body(carry, part):
        total, grads = carry
        if row_valid is None:
            (loss, aux), part_grads = grad_fn(params, part)
        else:
            part, valid = part
            out_shape = jax.eval_shape(grad_fn, params, part)
            skipped = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)
            (loss, aux), part_grads = jax.lax.cond(
                jnp.any(valid), lambda q: grad_fn(params, q), lambda q: skipped, part)
        return (total + loss, jax.tree.map(jnp.add, grads, part_grads)), aux

    if row_valid is not None:
        chunks = (chunks, row_valid.reshape(batch // size, size))
    (loss, grads), aux = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), chunks)
    aux = jax.tree.map(lambda y: y.reshape((batch,) + y.shape[2:]), aux)
    return (loss, aux), grads


__all__ = ["chunk_size", "apply_in_chunks", "value_and_grad_in_chunks"]
