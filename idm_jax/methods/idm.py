"""IDM (Zhao, Li, Qin, Yu; CVPR 2023), as the official code runs it.

The objective is the linear-kernel MMD of mean features plus the class-aware CE term weighted by
the extractor's running accuracy (``matching.idm_objective``; the config's ``distance`` and
``moment_weight`` swap or add terms). The image optimiser is the config's ``image_update``,
IDM's per-class SGD by default (``image_update.per_class_sgd``). The extractors come from the
model queue (``extractors.queue_schedule``). The presets are IDM's settings, so the method adds
none of its own.
"""

from idm_jax import extractors, image_update, matching
from idm_jax.base import Method

METHOD = Method(
    name="idm",
    description="IDM: linear MMD + accuracy-weighted CE, per-class SGD, the model queue",
    objective=matching.make_objective,
    image_optimizer=image_update.from_config,
    extractors=extractors.queue_schedule,
)
