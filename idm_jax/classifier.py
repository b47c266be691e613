"""Training a classifier: the one optimiser step that the model queue and the evaluation share.

Both train networks with PyTorch's SGD and cross-entropy (docs/FAITHFULNESS.md, "model queue",
"evaluation"); they differ only in what a batch is (real images for the queue, augmented
synthetic images with padded rows for the evaluation) and in what they keep from the forward
pass (the queue counts correct predictions, the evaluation carries BatchNorm statistics). Each
passes its own loss; ``train_step`` computes the gradient, in chunks where the device policy
asks for them, and applies the optimiser.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import optax

from idm_jax.accel import microbatch


def sgd(lr: float, momentum: float, weight_decay: float) -> optax.GradientTransformation:
    """PyTorch SGD with coupled L2: decay is added to the gradient before momentum."""
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(lr, momentum=momentum if momentum > 0 else None))


def train_step(loss_fn: Callable, params: Any, opt_state: Any, batch: Any,
               optimizer: optax.GradientTransformation, *, chunk: int = 0,
               row_valid: Optional[jax.Array] = None):
    """One optimiser step on ``batch``.

    Args:
      loss_fn: ``(params, batch) -> (loss, aux)``, the loss a sum of per-row terms when
        ``chunk`` > 0 (``microbatch.value_and_grad_in_chunks``); aux per row when chunked.
      batch: a pytree of arrays sharing the leading (row) axis.
      chunk: rows per gradient chunk (same values, faster on CPU); 0 the whole batch.
      row_valid: (n,) bool; chunks without a valid row are skipped (they must contribute 0).

    Returns ``(params, opt_state, aux)`` after the step.
    """
    (_, aux), grads = microbatch.value_and_grad_in_chunks(loss_fn, params, batch, chunk,
                                                          row_valid=row_valid)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, aux


__all__ = ["sgd", "train_step"]
