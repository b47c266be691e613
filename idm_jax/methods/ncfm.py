"""NCFM, "Dataset Distillation with Neural Characteristic Function" (Wang et al., CVPR 2025),
as its code runs it on CIFAR-10 (gszfwsb/NCFM ``de92fb8``; docs/METHODS.md, "NCFM").

- **Objective**: per class, 300 x the mean over 4,096 frequencies t ~ N(0, I) of
  sqrt(1/2 amplitude gap + 1/2 phase gap) of the characteristic functions of the L2-normalised
  real and synthetic features (``losses.ncfm_distance``); fresh frequencies per class and
  iteration. The learned frequency sampler is off in the shipped configs, so there is none.
- **Calibration**: after matching, each class's cross-entropy under the *trained* weights of
  the iteration's pool network (weight 1), stepped with the same optimiser
  (``calibration_weight``).
- **Image optimiser**: AdamW (lr 1e-3 = 0.01 x 0.1, weight decay 5e-4, PyTorch's betas and
  eps), one step per class with one state over the whole set (``image_update.per_class_steps``),
  on [0, 1] pixels clamped where each iteration starts; ReduceLROnPlateau (factor 0.5, patience
  500) once per iteration on the class-mean of the matching plus calibration losses.
- **Extractors**: a pool of pretrained ConvNet-3s (``experiments.pretrain --recipe ncfm``,
  ``--pool_dir``); each iteration draws one and l ~ U(0, 1) and matches with
  l x init + (1 - l) x trained.
- **Data**: the first ``batch_real`` images of each class every time (the code's loader quirk;
  ``--real_sampling random`` is the fix), factor-2 partition-and-expand, colour + crop + cutout
  while matching, 20,000 iterations.

Deviations (docs/METHODS.md): the start is a mosaic of random real images, not the first 4 IPC
images in file order; the pool is the size ``experiments.pretrain`` made (CPU default: 4
networks x 2 epochs, against 20 x 60 with CutMix); the evaluation is the project's common one.
"""

import functools

import jax
import optax

from idm_jax import extractors, image_update, losses, matching, pretrain
from idm_jax.base import Method

ADAMW = dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=5e-4)
PLATEAU = dict(factor=0.5, patience=500, threshold=1e-4)


def ncfm_distance(real_features, syn_features, real_mask, key, *, frequencies):
    """NCFM's loss in the objective's signature (frequencies drawn from the class's key)."""
    return losses.ncfm_distance(real_features, syn_features, real_mask, key=key,
                                num_frequencies=frequencies)


def objective(config):
    return functools.partial(
        matching.idm_objective, match_weight=config.match_weight,
        distance=functools.partial(ncfm_distance, frequencies=config.cf_frequencies))


def image_optimizer(config, num_classes):
    """Per-class AdamW with the plateau, in pixel units (the engine adds the pixel space)."""
    if config.image_update != DEFAULTS["image_update"]:
        raise ValueError(f"--image_update {config.image_update}: NCFM steps with its own "
                         f"per-class AdamW and plateau ({DEFAULTS['image_update']!r})")
    passes = config.train_net_num + (1 if config.calibration_weight > 0 else 0)
    return image_update.with_plateau(
        lambda lr: image_update.per_class_steps(optax.adamw(lr, **ADAMW), num_classes),
        config.lr_img, num_classes, passes_per_iteration=passes, **PLATEAU)


def pool_extractors(config, nets):
    """The pretrained pool in ``config.pool_dir``, checked against the run (network, dataset,
    validation split)."""
    template = jax.eval_shape(nets.init_params, jax.random.PRNGKey(0))
    pool = pretrain.load_pool_for(config, template, config.model, "ncfm", "ncfm")
    return extractors.interpolated_pool_schedule(pool["init"], pool["trained"])


DEFAULTS = dict(
    iterations=20000, lr_img=1e-3, image_update="adamw-per-class", batch_real=1024,
    real_sampling="first", cf_frequencies=4096, syn_ce=False, calibration_weight=1.0,
    train_net_num=1, init="mosaic", partition_expand=True, partition="uniform",
    partition_factor=2, match_dsa_strategy="color+crop+cutout", distance="linear",
    moment_weight=0.0)

METHOD = Method(
    name="ncfm",
    description="NCFM: characteristic-function loss on unit-norm features, per-class AdamW "
                "with a plateau on [0,1] pixels, an interpolated pretrained pool, CE "
                "calibration",
    objective=objective,
    image_optimizer=image_optimizer,
    extractors=pool_extractors,
    defaults=DEFAULTS,
    pixel_space=True,
)
