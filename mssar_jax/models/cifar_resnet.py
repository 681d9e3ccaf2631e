"""CIFAR ResNets: 6n+2 basic-block ResNets and the pre-activation bottleneck ResNet-164.

* ``CifarResNet`` (He et al., CVPR 2016, Sec. 4.2): 3x3 conv (16) then three stages of n
  basic blocks with 16, 32, 64 filters on 32, 16, 8 maps; option-A shortcuts (identity, with
  stride-2 subsampling and zero-padded channels when the shape changes); depth = 6n + 2.
* ``CifarPreActResNet`` (He et al., ECCV 2016): BN-ReLU-conv bottleneck blocks (1x1, 3x3, 1x1,
  expansion 4) with widths 16, 32, 64; projection shortcuts at stage starts;
  depth = 9n + 2 (164 -> n = 18).

Recalibration (if any) multiplies the residual branch before the addition: after the last
BatchNorm in the basic block, after the last conv in the pre-activation block (whose last
BatchNorm precedes its last conv).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mssar_jax.errors import ConfigError
from mssar_jax.models import common

ModuleDef = Any


def option_a_shortcut(x, features: int, stride: int):
  """Identity shortcut; when shapes change, subsample by ``stride`` and zero-pad channels."""
  if stride > 1:
    x = x[:, ::stride, ::stride, :]
  extra = features - x.shape[-1]
  if extra > 0:
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
  return x


class BasicBlock(nn.Module):
  """conv3x3-BN-ReLU-conv3x3-BN [-recalibration] + option-A shortcut, then ReLU."""
  features: int
  layers: common.Layers
  strides: int = 1
  zero_init_last_bn: bool = False

  @nn.compact
  def __call__(self, x):
    layers = self.layers
    y = layers.conv(self.features, (3, 3), self.strides, name="conv1")(x)
    y = nn.relu(layers.norm(name="bn1")(y))
    y = layers.conv(self.features, (3, 3), name="conv2")(y)
    scale_init = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones
    y = layers.norm_recalibrate(y, name="bn2", scale_init=scale_init)
    return layers.block_output(nn.relu(y + option_a_shortcut(x, self.features, self.strides)))


class CifarResNet(nn.Module):
  """ResNet-(6n+2) for 32x32 inputs with basic blocks and option-A shortcuts."""
  num_classes: int
  depth: int = 20
  width: int = 16
  recalibration: ModuleDef | None = None
  zero_init_residual: bool = False
  scan_blocks: bool = False
  dtype: Any = jnp.float32
  impl: common.Implementation = common.Implementation()

  def __post_init__(self):
    if (self.depth - 2) % 6 != 0 or self.depth < 8:
      raise ConfigError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (got {self.depth}); "
                        "use e.g. 20, 32, 44, 56 or 110.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    n = (self.depth - 2) // 6
    layers = common.Layers(self.impl, self.recalibration, self.dtype, train)
    x = layers.conv(self.width, (3, 3), name="stem_conv")(x.astype(self.dtype))
    x = nn.relu(layers.norm(name="stem_bn")(x))
    for stage in range(3):
      block = functools.partial(BasicBlock, features=self.width * 2 ** stage, layers=layers,
                                zero_init_last_bn=self.zero_init_residual)
      x = block(strides=1 if stage == 0 else 2, name=f"stage{stage + 1}_block1")(x)
      x = common.repeat_block(block, n - 1, x, f"stage{stage + 1}_blocks", self.scan_blocks)
    return common.classifier(x, self.num_classes, self.dtype)


class PreActBottleneck(nn.Module):
  """BN-ReLU-conv1x1, BN-ReLU-conv3x3, BN-ReLU-conv1x1(4w) [-recalibration] + shortcut."""
  width: int
  layers: common.Layers
  strides: int = 1
  project: bool = False

  @nn.compact
  def __call__(self, x):
    layers, out_features = self.layers, 4 * self.width
    pre = nn.relu(layers.norm(name="bn1")(x))
    shortcut = x
    if self.project:
      shortcut = layers.conv(out_features, (1, 1), self.strides, name="proj")(pre)
    y = layers.conv(self.width, (1, 1), name="conv1")(pre)
    y = nn.relu(layers.norm(name="bn2")(y))
    y = layers.conv(self.width, (3, 3), self.strides, name="conv2")(y)
    y = nn.relu(layers.norm(name="bn3")(y))
    y = layers.recalibrate(layers.conv(out_features, (1, 1), name="conv3")(y))
    return layers.block_output(y + shortcut)


class CifarPreActResNet(nn.Module):
  """Pre-activation bottleneck ResNet-(9n+2) for 32x32 inputs (ResNet-164: n = 18)."""
  num_classes: int
  depth: int = 164
  width: int = 16
  recalibration: ModuleDef | None = None
  scan_blocks: bool = False
  dtype: Any = jnp.float32
  impl: common.Implementation = common.Implementation()

  def __post_init__(self):
    if (self.depth - 2) % 9 != 0 or self.depth < 11:
      raise ConfigError(f"pre-activation CIFAR ResNet depth must be 9n+2 with n >= 1 "
                        f"(got {self.depth}); use e.g. 164 or 1001.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    n = (self.depth - 2) // 9
    layers = common.Layers(self.impl, self.recalibration, self.dtype, train)
    x = layers.conv(self.width, (3, 3), name="stem_conv")(x.astype(self.dtype))
    for stage in range(3):
      block = functools.partial(PreActBottleneck, width=self.width * 2 ** stage, layers=layers)
      x = block(strides=1 if stage == 0 else 2, project=True, name=f"stage{stage + 1}_block1")(x)
      x = common.repeat_block(block, n - 1, x, f"stage{stage + 1}_blocks", self.scan_blocks)
    x = nn.relu(layers.norm(name="final_bn")(x))
    return common.classifier(x, self.num_classes, self.dtype)
