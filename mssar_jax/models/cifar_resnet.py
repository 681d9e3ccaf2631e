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
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  recalibration: ModuleDef | None = None
  zero_init_last_bn: bool = False

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.features, (3, 3), self.strides)(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.features, (3, 3))(y)
    scale_init = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones
    y = common.norm_recalibrate(self.norm, self.recalibration, y, scale_init=scale_init)
    return common.materialize(nn.relu(y + option_a_shortcut(x, self.features, self.strides)))


class CifarResNet(nn.Module):
  """ResNet-(6n+2) for 32x32 inputs with basic blocks and option-A shortcuts."""
  num_classes: int
  depth: int = 20
  width: int = 16
  recalibration: ModuleDef | None = None
  zero_init_residual: bool = False
  scan_blocks: bool = False
  dtype: Any = jnp.float32

  def __post_init__(self):
    if (self.depth - 2) % 6 != 0 or self.depth < 8:
      raise ConfigError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (got {self.depth}); "
                        "use e.g. 20, 32, 44, 56 or 110.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    n = (self.depth - 2) // 6
    conv = common.make_conv(self.dtype)
    norm = common.make_norm(train, self.dtype)
    x = nn.relu(norm(name="stem_bn")(conv(self.width, (3, 3), name="stem_conv")(x.astype(self.dtype))))
    for stage in range(3):
      features = self.width * 2 ** stage
      block = functools.partial(BasicBlock, features=features, conv=conv, norm=norm,
                                recalibration=self.recalibration,
                                zero_init_last_bn=self.zero_init_residual)
      x = block(strides=1 if stage == 0 else 2, name=f"stage{stage + 1}_block1")(x)
      x = common.repeat_block(block, n - 1, x, f"stage{stage + 1}_blocks", self.scan_blocks)
    return common.classifier(x, self.num_classes, self.dtype)


class PreActBottleneck(nn.Module):
  """BN-ReLU-conv1x1, BN-ReLU-conv3x3, BN-ReLU-conv1x1(4w) [-recalibration] + shortcut."""
  width: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  project: bool = False
  recalibration: ModuleDef | None = None

  @nn.compact
  def __call__(self, x):
    out_features = 4 * self.width
    pre = nn.relu(self.norm()(x))
    shortcut = self.conv(out_features, (1, 1), self.strides, name="proj")(pre) if self.project else x
    y = self.conv(self.width, (1, 1))(pre)
    y = self.conv(self.width, (3, 3), self.strides)(nn.relu(self.norm()(y)))
    y = self.conv(out_features, (1, 1))(nn.relu(self.norm()(y)))
    y = common.recalibrate(self.recalibration, y)
    return common.materialize(y + shortcut)


class CifarPreActResNet(nn.Module):
  """Pre-activation bottleneck ResNet-(9n+2) for 32x32 inputs (ResNet-164: n = 18)."""
  num_classes: int
  depth: int = 164
  width: int = 16
  recalibration: ModuleDef | None = None
  scan_blocks: bool = False
  dtype: Any = jnp.float32

  def __post_init__(self):
    if (self.depth - 2) % 9 != 0 or self.depth < 11:
      raise ConfigError(f"pre-activation CIFAR ResNet depth must be 9n+2 with n >= 1 "
                        f"(got {self.depth}); use e.g. 164 or 1001.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    n = (self.depth - 2) // 9
    conv = common.make_conv(self.dtype)
    norm = common.make_norm(train, self.dtype)
    x = conv(self.width, (3, 3), name="stem_conv")(x.astype(self.dtype))
    for stage in range(3):
      block = functools.partial(PreActBottleneck, width=self.width * 2 ** stage, conv=conv,
                                norm=norm, recalibration=self.recalibration)
      x = block(strides=1 if stage == 0 else 2, project=True, name=f"stage{stage + 1}_block1")(x)
      x = common.repeat_block(block, n - 1, x, f"stage{stage + 1}_blocks", self.scan_blocks)
    x = nn.relu(norm(name="final_bn")(x))
    return common.classifier(x, self.num_classes, self.dtype)
