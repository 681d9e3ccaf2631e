"""mssar-jax: Multi-Scale Spatially-Asymmetric Recalibration (MS-SAR) in JAX/Flax.

Subpackages:
  mssar_jax.recalibration  SE and MS-SAR modules, selected by name.
  mssar_jax.models         CIFAR / ImageNet ResNets and DenseNets with a recalibration hook.
"""

__version__ = "0.1.0"
