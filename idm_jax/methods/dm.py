"""DM, "Dataset Condensation with Distribution Matching" (Zhao and Bilen, WACV 2023).

Its objective is the linear-kernel MMD of mean features under Siamese DSA, with no CE term; its
image optimiser one SGD-momentum step (lr 1, momentum 0.5) on the loss summed over classes; its
extractor a freshly initialised network every iteration, never trained; its synthetic set
initialised with real images and used as is (no partition-and-expand). ``net_generate_interval``
is how often a fresh network is drawn (1 for DM).
"""

from idm_jax import extractors, image_update, matching
from idm_jax.base import Method

DEFAULTS = dict(partition_expand=False, init="real", syn_ce=False, image_update="summed",
                lr_img=1.0, img_momentum=0.5, net_generate_interval=1)

METHOD = Method(
    name="dm",
    description="DM: linear MMD, one summed SGD step (lr 1), a fresh random extractor each "
                "iteration, real init, no partition-and-expand",
    objective=matching.make_objective,
    image_optimizer=image_update.from_config,
    extractors=lambda config, nets: extractors.fresh_schedule(nets,
                                                              config.net_generate_interval),
    defaults=DEFAULTS,
)
