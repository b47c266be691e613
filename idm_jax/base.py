"""The types and protocols of a condensation method; a leaf module that imports nothing of idm_jax.

A distribution-matching method is three replaceable pieces on one engine (``idm_jax.engine``):

- an **objective**: one class's loss from the features of its real batch and of its synthetic
  images under the iteration's extractor (vmapped over classes for you);
- an **image optimiser**: how the synthetic images move, optax-style (``ImageOptimizer``); any
  ``optax.GradientTransformation`` becomes one with ``image_update.from_optax``;
- an **extractor schedule**: where the feature extractors come from, which one each matching pass
  uses, and how they are trained (``ExtractorSchedule``): IDM's queue of semi-trained models, DM's
  fresh random network, ...

A ``Method`` binds the three, with the config settings that define it, under a name
(``idm_jax.methods``). Every piece's state is a pytree inside ``engine.CondenseState``, so it is
checkpointed, sharded and resumed like the rest.

Shapes: K classes, ipc stored images per class, N = K * ipc, images (H, W, C) in the network's
normalised input space, D feature width, L logits.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax

PyTree = Any
Config = Any          # idm_jax.config.Config (not imported: this module is a leaf)

# objective(real_features (B, D), real_mask (B,), syn_features (P, D), syn_logits (P, L),
#           label (), ce_scale (), key) -> (loss (), {term name: ()}), for one class. The real
# features are constants; ``key`` is the class's own (its Siamese DSA key). With an auxiliary
# network (``Config.auxiliary_model``) it is also given ``aux_features=`` (P, D_aux), that
# network's embedding of the same synthetic views (IID's pretrained ResNet-18).
Objective = Callable[..., tuple[jax.Array, dict]]


class ImageOptimizer(NamedTuple):
    """How the synthetic images move: optax's ``init`` / ``update``, returning new images.

    ``init(images (N, H, W, C)) -> state``: the optimiser's state, a pytree (leaves shaped like
    the images are split over devices with them, the others replicated).

    ``grad_point(state, images) -> images``: where the gradient is taken; None takes it at the
    images. IDM's per-class SGD takes each class's gradient after the momentum-only moves of the
    classes stepped before it (``image_update.per_class_sgd``).

    ``update(grads, state, images, value, point=None) -> (new images, state)``: one step from
    ``images`` (as they were before the step, like optax's params), given the gradient of the
    summed class losses at ``point`` (``grad_point``'s images, which the engine passes so that
    they are not recomputed: a recomputation can round differently), ``value``, that summed
    loss (), for optimisers that read it (reduce-on-plateau).
    """

    init: Callable[[jax.Array], PyTree]
    update: Callable[..., tuple[jax.Array, PyTree]]
    grad_point: Optional[Callable[[PyTree, jax.Array], jax.Array]] = None


class Networks(NamedTuple):
    """The extractor network of a run as the engine built it for its device (handed to a
    schedule's factory)."""

    init_params: Callable[[jax.Array], PyTree]                  # key -> fresh params
    apply: Callable[[PyTree, jax.Array], tuple[jax.Array, jax.Array]]  # -> (features, logits)
    optimizer: Any                          # optax transformation that trains an extractor
    map_models: Callable                    # f -> f over stacked models (jax.vmap, or in turn)
    chunk: int                              # images per network call; 0 whole batches
    auxiliary_init: Optional[Callable] = None   # key -> params of the auxiliary network


class ExtractorSchedule(NamedTuple):
    """Where feature extractors come from, which one a matching pass uses, how they learn.

    ``init(key) -> state``: the schedule's state (a pytree) at iteration 0.
    ``refresh(state, iteration (), key) -> state``: the start of an outer iteration.
    ``draw(state, key) -> (params, accuracy ())``: the extractor of one matching pass and its
    running training accuracy in percent (it scales IDM's CE term; 0 for untrained networks).
    ``train(state, real, layout, select_key, batch_key) -> (state, metrics)``: the end of an
    outer iteration; ``real`` is the run's ``RealData``, ``layout`` its ``sharding.ClassLayout``;
    ``metrics`` holds ``trainee_acc`` and ``queue_size`` (scalars).
    ``calibration(state) -> params``: optional, the network of a calibration pass (NCFM's CE
    step on a trained network), run after the matching passes when ``calibration_weight`` > 0.
    ``auxiliary(state) -> params``: optional, the auxiliary network's params for this
    iteration (``Config.auxiliary_model``; IID's pretrained ResNet-18).
    """

    init: Callable[[jax.Array], PyTree]
    refresh: Callable[[PyTree, jax.Array, jax.Array], PyTree]
    draw: Callable[[PyTree, jax.Array], tuple[PyTree, jax.Array]]
    train: Callable[..., tuple[PyTree, dict]]
    calibration: Optional[Callable[[PyTree], PyTree]] = None
    auxiliary: Optional[Callable[[PyTree], PyTree]] = None


@dataclasses.dataclass(frozen=True)
class Method:
    """A condensation method: its three pieces, each built from the run's config, and the config
    settings that define it (applied over a preset by ``methods.with_method``).

    ``objective(config) -> Objective``; ``image_optimizer(config, num_classes) ->
    ImageOptimizer``; ``extractors(config, networks) -> ExtractorSchedule``.

    ``pixel_space``: the image optimiser is written for images in [0, 1] pixel units, clamped
    to [0, 1] where each iteration starts (M3D, NCFM); the engine runs it on its normalised
    images through ``image_update.in_pixel_space`` with the data's mean and std. False (IDM,
    DM): it steps the normalised images directly.
    """

    name: str
    description: str
    objective: Callable[[Config], Objective]
    image_optimizer: Callable[[Config, int], ImageOptimizer]
    extractors: Callable[[Config, Networks], ExtractorSchedule]
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    pixel_space: bool = False


__all__ = ["PyTree", "Objective", "ImageOptimizer", "Networks", "ExtractorSchedule", "Method"]
