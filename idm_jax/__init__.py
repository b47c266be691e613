"""idm-jax: IDM (Improved Distribution Matching for Dataset Condensation) in JAX/Flax.

The public API is a set of pure functions over NHWC arrays and explicit pytrees (see README.md):

- ``partition_expand``, ``partition_expand_labels``, ``mosaic``: IDM's partition-and-expand.
- ``mmd``, ``class_mmd``, ``class_aware_ce``: the matching loss and the class-aware regulariser.
- ``dsa``, ``DSAParams``: differentiable Siamese augmentation.
- ``models``: Flax ConvNet / AlexNet / VGG11 / ResNet18 and ``get_model`` by official name.
- ``condense(config, train_images, train_labels, mean=..., std=...)``: run IDM.
- ``evaluate(key, images, labels, test_images, test_labels, model=...)``: the official protocol.

``idm_jax.condense`` and ``idm_jax.evaluate`` are the modules and, called, their entry points.
The data loaders (``idm_jax.data``) import tensorflow-datasets lazily, only for TFDS sources.
"""

from idm_jax import checkpoint, condense, config, evaluate, models, queue
from idm_jax.augment import DSAParams, dsa
from idm_jax.config import Config, get_preset
from idm_jax.losses import class_aware_ce, class_mmd, mmd
from idm_jax.models import get_model
from idm_jax.partition import mosaic, partition_expand, partition_expand_labels

__version__ = "0.1.0"
