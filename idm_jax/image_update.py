"""Image optimisers: how the synthetic images move (``base.ImageOptimizer``).

IDM's is SGD with momentum as the official code steps it, one class at a time (``per_class_sgd``);
DM's one step on the summed loss (``summed_sgd``); any optax transformation (adam, adamw, a
schedule, reduce-on-plateau) through ``from_optax``. ``OPTIMIZERS`` names the ones a config can
choose with ``image_update``; a method file may build its own.

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

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from idm_jax.base import ImageOptimizer

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


def _class_major(x: jax.Array, num_classes: int) -> jax.Array:
    return x.reshape((num_classes, -1) + x.shape[1:])


def per_class_sgd(lr: float, mu: float, num_classes: int) -> ImageOptimizer:
    """IDM's optimiser: one SGD-momentum step per class in class order, one shared buffer.

    The state is the momentum buffer (N, H, W, C). ``grad_point`` moves each class's rows by
    the momentum-only steps of the classes before it; ``update``, given the gradient there,
    applies the C sequential steps in closed form (the same operations as
    ``per_class_image_update``, so the same values to the bit).
    """
    c = jnp.arange(num_classes)

    def expand(v, ndim):
        return v.reshape((num_classes,) + (1,) * (ndim - 1))

    def point(momentum, images):
        x, buf = _class_major(images, num_classes), _class_major(momentum, num_classes)
        before = expand(mu * _geometric(mu, c), x.ndim)     # momentum-only moves before step c
        return (x - lr * before * buf).reshape(images.shape)

    def update(grads, momentum, images, value, at_point=None):
        del value
        if at_point is None:      # the engine passes grad_point's own (recomputing can round
            at_point = point(momentum, images)           # differently; CIFAR-10 showed it)
        at_step = _class_major(at_point, num_classes)
        buf0, g = _class_major(momentum, num_classes), _class_major(grads, num_classes)
        ndim = at_step.ndim
        buf = expand(mu ** (c + 1.0), ndim) * buf0 + g      # buffer right after step c
        after = expand(_geometric(mu, num_classes - c), ndim)   # step c and the C-1-c after
        new_images = at_step - lr * after * buf
        new_momentum = expand(mu ** (num_classes - 1.0 - c), ndim) * buf
        return new_images.reshape(at_point.shape), new_momentum.reshape(at_point.shape)

    return ImageOptimizer(init=jnp.zeros_like, update=update, grad_point=point)


def summed_sgd(lr: float, mu: float) -> ImageOptimizer:
    """DM's optimiser: one SGD-momentum step on the loss summed over classes (PyTorch's SGD,
    ``buf = mu * buf + g; x -= lr * buf``). The state is the buffer (N, H, W, C)."""
    def update(grads, momentum, images, value, point=None):
        del value, point
        new_images, buf, _ = summed_image_update(images, momentum, lambda _: (grads, None), lr,
                                                 mu)
        return new_images, buf

    return ImageOptimizer(init=jnp.zeros_like, update=update)


def from_optax(transformation: optax.GradientTransformation) -> ImageOptimizer:
    """Any optax transformation as an image optimiser; it is given ``value=`` (the summed loss),
    which transformations that read it (``optax.contrib.reduce_on_plateau``) use."""
    tx = optax.with_extra_args_support(transformation)

    def update(grads, state, images, value, point=None):
        del point
        updates, state = tx.update(grads, state, images, value=value)
        return optax.apply_updates(images, updates), state

    return ImageOptimizer(init=tx.init, update=update)


def per_class_steps(transformation: optax.GradientTransformation,
                    num_classes: int) -> ImageOptimizer:
    """One step of ``transformation`` per class, in class order, over the whole set with one
    state: what a PyTorch optimiser does when a code calls ``step()`` after each class's loss.

    Rows of the other classes get a zero gradient at each step, yet an optimiser with memory
    (Adam's moments, weight decay) still moves them, and Adam's step count advances once per
    class. ``grad_point`` gives each class's rows where they stand at their own step (after the
    zero-gradient steps of the classes before); ``update`` replays the ``num_classes`` steps.
    The transformation must act on each pixel on its own (sgd, adam, adamw, ...): the gradient
    point of a class's rows then does not depend on the other classes' gradients.
    """
    def class_of_row(images):
        ipc = images.shape[0] // num_classes
        return jnp.repeat(jnp.arange(num_classes), ipc).reshape(
            (-1,) + (1,) * (images.ndim - 1))

    def steps(state, images, grads):
        """Run the class steps; returns (images, state, each row's value at its class's step)."""
        rows = class_of_row(images)

        def step(carry, c):
            x, st, at_own = carry
            at_own = jnp.where(rows == c, x, at_own)
            g = jnp.zeros_like(x) if grads is None else jnp.where(rows == c, grads, 0.0)
            updates, st = transformation.update(g, st, x)
            return (optax.apply_updates(x, updates), st, at_own), None

        (x, st, at_own), _ = jax.lax.scan(step, (images, state, images),
                                          jnp.arange(num_classes))
        return x, st, at_own

    def point(state, images):
        return steps(state, images, None)[2]

    def update(grads, state, images, value, point=None):
        del value, point
        x, state, _ = steps(state, images, grads)
        return x, state

    return ImageOptimizer(init=transformation.init, update=update, grad_point=point)


class PlateauState(NamedTuple):
    """``inner``: the optimiser's state; ``lr``: the current rate; ``best``, ``bad``: the
    plateau counters; ``total``: the loss summed over this iteration's passes so far;
    ``passes``: passes stepped so far."""

    inner: Any
    lr: jax.Array
    best: jax.Array
    bad: jax.Array
    total: jax.Array
    passes: jax.Array


def with_plateau(make_optimizer: Callable[[jax.Array], ImageOptimizer], lr: float,
                 num_classes: int, passes_per_iteration: int = 1, factor: float = 0.5,
                 patience: int = 500, threshold: float = 1e-4) -> ImageOptimizer:
    """PyTorch's ``ReduceLROnPlateau`` (mode min, relative threshold, no cooldown) stepped once
    per outer iteration with the iteration's loss averaged over classes, as NCFM steps it.

    ``make_optimizer(lr)`` builds the optimiser at a (traced) rate; its state must not depend on
    the rate. Each update adds its ``value`` (the loss summed over classes) to the iteration's
    total; the first update of the next iteration (every ``passes_per_iteration`` passes) first
    steps the plateau with ``total / num_classes``, so the new rate applies from that iteration
    on, as after PyTorch's ``scheduler.step`` at the end of an iteration.
    """
    def pending(state):
        """(rate, best, bad) once the iteration that just ended, if any, is counted."""
        ended = (state.passes > 0) & (state.passes % passes_per_iteration == 0)
        metric = state.total / num_classes
        better = metric < state.best * (1.0 - threshold)
        best = jnp.where(ended & better, metric, state.best)
        bad = jnp.where(ended, jnp.where(better, 0, state.bad + 1), state.bad)
        cut = ended & (bad > patience)
        return (jnp.where(cut, state.lr * factor, state.lr), best, jnp.where(cut, 0, bad),
                ended)

    def init(images):
        inner = make_optimizer(jnp.float32(lr)).init(images)
        return PlateauState(inner, jnp.float32(lr), jnp.float32(jnp.inf), jnp.int32(0),
                            jnp.float32(0.0), jnp.int32(0))

    def point(state, images):
        optimizer = make_optimizer(pending(state)[0])
        return images if optimizer.grad_point is None else optimizer.grad_point(state.inner,
                                                                                  images)

    def update(grads, state, images, value, point=None):
        rate, best, bad, ended = pending(state)
        images, inner = make_optimizer(rate).update(grads, state.inner, images, value, point)
        total = jnp.where(ended, 0.0, state.total) + value
        return images, PlateauState(inner, rate, best, bad, total, state.passes + 1)

    return ImageOptimizer(init=init, update=update, grad_point=point)


def in_pixel_space(optimizer: ImageOptimizer, mean, std, clamp: bool = True) -> ImageOptimizer:
    """An optimiser written for images in [0, 1] pixel units, run on the engine's normalised
    images ``(pixels - mean) / std``.

    M3D and NCFM store their images as pixels, step them there and normalise only in front of
    the network. The state, the step sizes and the clamp are in pixel units: the wrapper hands
    ``optimizer`` the pixels and the pixel gradient (the normalised gradient divided by
    ``std``) and normalises what it returns. With ``clamp`` the pixels are clamped to [0, 1]
    where each outer iteration starts (the gradient point), as those codes do before their
    class steps; the images after the last step are left unclamped, like theirs.

    Args:
      optimizer: the optimiser in pixel units.
      mean, std: (C,) the normalisation constants (channels last), pixel units.
    """
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    to_pixels = lambda x: x * std + mean
    to_normalised = lambda p: (p - mean) / std

    def start(images):         # the pixels where the iteration starts (clamped)
        pixels = to_pixels(images)
        return jnp.clip(pixels, 0.0, 1.0) if clamp else pixels

    def point(state, images):
        pixels = start(images)
        if optimizer.grad_point is not None:
            pixels = optimizer.grad_point(state, pixels)
        return to_normalised(pixels)

    def update(grads, state, images, value, point=None):
        at = None if point is None else to_pixels(point)
        pixels, state = optimizer.update(grads / std, state, start(images), value, at)
        return to_normalised(pixels), state

    return ImageOptimizer(init=lambda images: optimizer.init(to_pixels(images)), update=update,
                          grad_point=point)


# The image optimisers a config names with ``image_update``: (config, num_classes) -> optimiser.
OPTIMIZERS: dict[str, Callable] = {
    "per_class": lambda c, k: per_class_sgd(c.lr_img, c.img_momentum, k),
    "summed": lambda c, k: summed_sgd(c.lr_img, c.img_momentum),
    "sgd": lambda c, k: from_optax(optax.sgd(c.lr_img, momentum=c.img_momentum or None)),
    "adam": lambda c, k: from_optax(optax.adam(c.lr_img)),
}


def from_config(config, num_classes: int) -> ImageOptimizer:
    """The image optimiser ``config.image_update`` names (``OPTIMIZERS``)."""
    if config.image_update not in OPTIMIZERS:
        raise ValueError(f"--image_update must be one of {', '.join(OPTIMIZERS)}, got "
                         f"{config.image_update!r} (a method file can bring its own optimiser: "
                         f"README, 'Write your own method')")
    return OPTIMIZERS[config.image_update](config, num_classes)


__all__ = ["per_class_image_update", "summed_image_update", "sequential_image_update",
           "per_class_sgd", "summed_sgd", "from_optax", "per_class_steps", "PlateauState",
           "with_plateau", "in_pixel_space", "OPTIMIZERS",
           "from_config"]
