"""idm-jax: IDM (Improved Distribution Matching for Dataset Condensation) in JAX/Flax.

The public API is a set of pure functions over NHWC arrays and explicit pytrees (README.md has
the table of modules):

- ``condense(config, train_images, train_labels, mean=..., std=...)``: run IDM, get the set.
- ``evaluate(key, images, labels, test_images, test_labels, model=...)``: the official protocol.
- ``condense_and_evaluate(config, dataset, workdir)``: the whole run with checkpoints, resuming
  and outputs (``idm_jax.runs.run``), as the command line runs it.
- ``partition_expand``, ``partition_expand_labels``, ``mosaic``: IDM's partition-and-expand.
- ``mmd``, ``class_mmd``, ``class_aware_ce``, ``idm_objective``: the matching objective.
- ``dsa``, ``DSAParams``: differentiable Siamese augmentation.
- ``get_model``: Flax ConvNet / AlexNet / VGG11 / ResNet18 by official name.
- ``export.export_set`` / ``load_set``: the condensed set in the layouts other toolkits read.

The data loaders (``idm_jax.data``) import tensorflow-datasets lazily, only for TFDS sources.
"""

from idm_jax import (config, engine, evaluation, image_update, iterating, matching, queue, real,
                     validate)
from idm_jax.accel import backend, sharding
from idm_jax.nn import models
from idm_jax.runs import checkpoint, export, torch_format, workdir
from idm_jax.augment import DSAParams, dsa
from idm_jax.config import Config
from idm_jax.presets import get_preset
from idm_jax.iterating import condense
from idm_jax.evaluation import evaluate
from idm_jax.losses import class_aware_ce, class_mmd, mmd
from idm_jax.matching import idm_objective
from idm_jax.nn.models import get_model
from idm_jax.partition import mosaic, partition_expand, partition_expand_labels
from idm_jax.runs.run import condense_and_evaluate

__version__ = "0.2.0"

__all__ = ["backend", "checkpoint", "config", "engine", "evaluation", "export", "image_update",
           "iterating", "matching", "models", "queue", "real", "sharding", "torch_format",
           "validate", "workdir",
           "DSAParams", "dsa", "Config", "get_preset",
           "condense", "evaluate", "class_aware_ce", "class_mmd", "mmd", "idm_objective",
           "get_model", "mosaic", "partition_expand", "partition_expand_labels",
           "condense_and_evaluate"]
