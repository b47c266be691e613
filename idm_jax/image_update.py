"""The optimiser of the synthetic images: SGD with momentum, as the official code steps it.

The official image optimiser takes one SGD step per class, in class order, with the momentum
buffer of the whole tensor (docs/FAITHFULNESS.md, "image update"). Class ``c``'s rows only move by
momentum before their own step, so where every class's rows stand at its own step has a closed
form: ``per_class_image_update`` gets all class gradients in one batched backward pass at those
points and applies the C sequential steps in closed form. ``sequential_image_update`` is the
plain loop it must equal (tested). ``summed_image_update`` is DM's single step on the loss summed
over classes (an option).

All functions take images and momentum shaped (K, ipc, H, W, C) and a ``grad_at`` function that
maps images of that shape to (gradient of each class's loss w.r.t. its own rows, aux).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

GradFn = Callable[[jax.Array], tuple]   # (K, ipc, H, W, C) images -> (same-shape grads, aux)


def _geometric(mu: float, n: jax.Array) -> jax.Array:
    """sum_{j=0}^{n-1} mu**j for integer arrays n (mu in [0, 1])."""
    n = n.astype(jnp.float32)
    return n if mu == 1.0 else (1.0 - mu ** n) / (1.0 - mu)


def per_class_image_update(images, momentum, grad_at: GradFn, lr: float, mu: float):
    """C sequential class steps of PyTorch SGD-momentum in closed form.

    Class ``c`` (rows ``c*ipc..``) first moves ``c`` times by momentum alone, then takes its own
    step with gradient ``g_c``, then moves ``C-1-c`` more times by momentum. With ``b`` the buffer
    at the start: its rows stand at ``x - lr*b*mu*(1-mu^c)/(1-mu)`` when its gradient is taken.

    Args:
      images, momentum: (K, ipc, H, W, C).
      grad_at: maps the images *at each class's own step* to every class's gradient w.r.t. its
        own rows (same shape) and aux outputs.
      lr, mu: learning rate and momentum of the image optimiser.

    Returns (new images, new momentum, aux).
    """
    num_classes = images.shape[0]
    c = jnp.arange(num_classes)
    expand = lambda v: v.reshape((num_classes,) + (1,) * (images.ndim - 1))
    before = expand(mu * _geometric(mu, c))                  # momentum-only moves before step c
    at_step = images - lr * before * momentum
    grads, aux = grad_at(at_step)
    buf = expand(mu ** (c + 1.0)) * momentum + grads          # buffer right after step c
    after = expand(_geometric(mu, num_classes - c))           # step c and the C-1-c that follow
    new_images = at_step - lr * after * buf
    new_momentum = expand(mu ** (num_classes - 1.0 - c)) * buf
    return new_images, new_momentum, aux


def summed_image_update(images, momentum, grad_at: GradFn, lr: float, mu: float):
    """DM's optimiser: one SGD-momentum step on the loss summed over classes.

    Same arguments and returns as ``per_class_image_update``.
    """
    grads, aux = grad_at(images)
    buf = mu * momentum + grads
    return images - lr * buf, buf, aux


def sequential_image_update(images, momentum, class_grad, lr: float, mu: float):
    """Reference: the official loop, one SGD step per class over the whole tensor (lax.scan).

    ``class_grad(c, images)`` returns the gradient of class ``c``'s loss w.r.t. its rows
    (ipc, H, W, C). Shapes as ``per_class_image_update``; returns (images, momentum).
    """
    def step(carry, c):
        x, buf = carry
        g = jnp.zeros_like(x).at[c].set(class_grad(c, x[c]))
        buf = mu * buf + g
        return (x - lr * buf, buf), None

    (x, buf), _ = jax.lax.scan(step, (images, momentum), jnp.arange(images.shape[0]))
    return x, buf


UPDATES = {"per_class": per_class_image_update, "summed": summed_image_update}

__all__ = ["per_class_image_update", "summed_image_update", "sequential_image_update", "UPDATES"]
