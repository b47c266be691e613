"""A condensation method in one file: DM's matching, Adam on the pixels, a fresh extractor
every 5 iterations.

Run it with any experiment, e.g.

    python -m experiments.digits --method examples/dm_adam.py:DM_ADAM
    python -m experiments.cifar10 --ipc 10 --method examples/dm_adam.py:DM_ADAM --smoke

The run gets everything a built-in method gets: checkpoints and resume (a resume with another
method, other settings or an edited copy of this file is refused), evaluation, exports, the
report. README, "Write your own method", walks through it.
"""

import optax

from idm_jax import extractors, image_update, losses
from idm_jax.base import Method


def objective(config):
    """One class's loss: the squared distance between its mean real and mean synthetic features
    (the linear-kernel MMD of DM and IDM), with no cross-entropy term."""
    del config

    def loss(real_features, real_mask, syn_features, syn_logits, label, ce_scale, key):
        # real_features (B, D), real_mask (B,), syn_features (P, D): this class only.
        distance = losses.mmd(real_features, syn_features, real_mask)
        return distance, {"mmd": distance}

    return loss


def image_optimizer(config, num_classes):
    """Adam on the synthetic pixels; any optax transformation works the same way."""
    del num_classes
    return image_update.from_optax(optax.adam(config.lr_img))


def schedule(config, networks):
    """A freshly initialised, never trained network, replaced every 5 iterations."""
    del config
    return extractors.fresh_schedule(networks, every=5)


DM_ADAM = Method(
    name="dm-adam-fresh5",
    description="DM's mean-feature matching, Adam (lr 0.01), a fresh extractor every 5 iterations",
    objective=objective,
    image_optimizer=image_optimizer,
    extractors=schedule,
    # Settings over the preset: DM's real-image init without partition-and-expand, and the
    # image step size that Adam wants (it moves each pixel by about lr per step).
    defaults=dict(partition_expand=False, init="real", syn_ce=False, lr_img=0.01),
)
