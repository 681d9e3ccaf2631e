"""DenseNets (Huang et al., CVPR 2017) for CIFAR and ImageNet.

A dense block of L layers: layer l maps the concatenation of all previous features
(C0 + l*k channels) to k new features (k = growth rate), by BN-ReLU-conv3x3, or with the
bottleneck ("B") BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k). Transitions between blocks:
BN-ReLU-conv1x1 to floor(theta * C) channels ("C": theta = 0.5), then 2x2 average pooling.

* CIFAR: 3x3 stem conv (16, or 2k for BC), three blocks of (depth - 4) / 3 layers
  ((depth - 4) / 6 with bottlenecks) on 32, 16, 8 maps. DenseNet-40 (k=12) and DenseNet-BC-100
  (k=12).
* ImageNet (torchvision layout): 7x7/2 stem conv (64), BN, ReLU, 3x3/2 max-pool; blocks
  (6, 12, 24, 16) with k = 32, bottlenecks and theta = 0.5 for DenseNet-121.

Recalibration (if any) multiplies each layer's k new features before they are concatenated.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mssar_jax.errors import ConfigError
from mssar_jax.models import common

ModuleDef = Any


class DenseLayer(nn.Module):
  """[BN-ReLU-conv1x1(bn_size*k)] BN-ReLU-conv3x3(k) [-recalibration]: the k new features."""
  growth_rate: int
  layers: common.Layers
  bottleneck: bool = False
  bn_size: int = 4

  @nn.compact
  def __call__(self, x):
    layers, y = self.layers, x
    if self.bottleneck:
      y = nn.relu(layers.norm(name="bn1")(y))
      y = layers.conv(self.bn_size * self.growth_rate, (1, 1), name="conv1")(y)
    y = layers.conv(self.growth_rate, (3, 3), name="conv2")(nn.relu(layers.norm(name="bn2")(y)))
    return layers.recalibrate(y)


class Transition(nn.Module):
  """BN-ReLU-conv1x1 to ``features`` channels, then 2x2 average pooling."""
  features: int
  layers: common.Layers

  @nn.compact
  def __call__(self, x):
    x = nn.relu(self.layers.norm(name="bn")(x))
    x = self.layers.conv(self.features, (1, 1), name="conv")(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


def dense_stages(x, block_sizes, growth_rate, compression, layers: common.Layers,
                 bottleneck: bool):
  """Dense blocks with transitions between them (none after the last block)."""
  for stage, count in enumerate(block_sizes):
    c0 = x.shape[-1]
    buf = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, count * growth_rate)))
    for i in range(count):
      width = c0 + i * growth_rate
      layer = DenseLayer(growth_rate, layers, bottleneck=bottleneck,
                         name=f"block{stage + 1}_layer{i + 1}")
      y = layer(buf[..., :width])
      buf = jax.lax.dynamic_update_slice_in_dim(buf, y.astype(buf.dtype), width, axis=3)
    x = buf
    if stage + 1 < len(block_sizes):
      features = int(x.shape[-1] * compression)
      x = Transition(features, layers, name=f"transition{stage + 1}")(x)
  return x


class CifarDenseNet(nn.Module):
  """DenseNet for 32x32 inputs: DenseNet-40 (k=12) or DenseNet-BC-100 (k=12)."""
  num_classes: int
  depth: int = 40
  growth_rate: int = 12
  bottleneck: bool = False
  compression: float = 1.0
  recalibration: ModuleDef | None = None
  dtype: Any = jnp.float32
  impl: common.Implementation = common.Implementation()

  def __post_init__(self):
    per_layer = 6 if self.bottleneck else 3
    if (self.depth - 4) % per_layer != 0 or self.depth < 4 + per_layer:
      kind = "6n+4 (with bottlenecks)" if self.bottleneck else "3n+4"
      raise ConfigError(f"CIFAR DenseNet depth must be {kind} with n >= 1 (got {self.depth}); "
                        "use e.g. 40 (DenseNet) or 100 (DenseNet-BC).")
    if not 0 < self.compression <= 1:
      raise ConfigError(f"DenseNet compression must be in (0, 1] (got {self.compression}); "
                        "use 1.0 (DenseNet) or 0.5 (DenseNet-BC).")
    if self.growth_rate < 1:
      raise ConfigError(f"DenseNet growth_rate must be >= 1 (got {self.growth_rate}); use e.g. 12.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    count = (self.depth - 4) // (6 if self.bottleneck else 3)
    layers = common.Layers(self.impl, self.recalibration, self.dtype, train)
    stem = 2 * self.growth_rate if self.bottleneck else 16
    x = layers.conv(stem, (3, 3), name="stem_conv")(x.astype(self.dtype))
    x = dense_stages(x, (count,) * 3, self.growth_rate, self.compression, layers,
                     self.bottleneck)
    x = nn.relu(layers.norm(name="final_bn")(x))
    return common.classifier(x, self.num_classes, self.dtype)


class DenseNet(nn.Module):
  """ImageNet DenseNet in the torchvision layout; defaults are DenseNet-121."""
  num_classes: int
  block_sizes: Sequence[int] = (6, 12, 24, 16)
  growth_rate: int = 32
  init_features: int = 64
  compression: float = 0.5
  recalibration: ModuleDef | None = None
  dtype: Any = jnp.float32
  impl: common.Implementation = common.Implementation()

  @nn.compact
  def __call__(self, x, train: bool = False):
    layers = common.Layers(self.impl, self.recalibration, self.dtype, train)
    x = layers.conv(self.init_features, (7, 7), 2, name="stem_conv")(x.astype(self.dtype))
    x = nn.relu(layers.norm(name="stem_bn")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    x = dense_stages(x, self.block_sizes, self.growth_rate, self.compression, layers, True)
    x = nn.relu(layers.norm(name="final_bn")(x))
    return common.classifier(x, self.num_classes, self.dtype)
