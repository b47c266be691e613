"""idm-jax: IDM (Improved Distribution Matching for Dataset Condensation) in JAX/Flax.

The public API is a set of pure functions over NHWC arrays and explicit pytrees; see README.md.
"""

from idm_jax.partition import mosaic, partition_expand, partition_expand_labels
from idm_jax.losses import class_aware_ce, class_mmd, mmd

__version__ = "0.1.0"
