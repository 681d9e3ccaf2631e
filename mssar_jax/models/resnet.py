"""ImageNet ResNets in the torchvision layout (ResNet v1.5: stride on the 3x3 conv).

Stem: 7x7/2 conv (64), BN, ReLU, 3x3/2 max-pool. Four stages of bottleneck blocks
(1x1 w, 3x3 w, 1x1 4w; w = 64, 128, 256, 512) on 56, 28, 14, 7 maps for 224x224 inputs;
projection shortcuts (1x1 conv + BN) where the shape changes. Recalibration multiplies the
branch after its last BatchNorm, before the addition (as in SE-ResNet).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from mssar_jax.models import common

ModuleDef = Any


class Bottleneck(nn.Module):
  """conv1x1-BN-ReLU, conv3x3(stride)-BN-ReLU, conv1x1(4w)-BN [-recalibration] + shortcut, ReLU."""
  width: int
  layers: common.Layers
  strides: int = 1
  project: bool = False
  zero_init_last_bn: bool = False

  @nn.compact
  def __call__(self, x):
    layers, out_features = self.layers, 4 * self.width
    y = nn.relu(layers.norm(name="bn1")(layers.conv(self.width, (1, 1), name="conv1")(x)))
    y = layers.conv(self.width, (3, 3), self.strides, name="conv2")(y)
    y = nn.relu(layers.norm(name="bn2")(y))
    y = layers.conv(out_features, (1, 1), name="conv3")(y)
    scale_init = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones
    y = layers.norm_recalibrate(y, name="bn3", scale_init=scale_init)
    shortcut = x
    if self.project:
      shortcut = layers.conv(out_features, (1, 1), self.strides, name="proj_conv")(x)
      shortcut = layers.norm(name="proj_bn")(shortcut)
    return layers.block_output(nn.relu(y + shortcut))


class ResNet(nn.Module):
  """Bottleneck ResNet for ImageNet; ``stage_sizes`` (3, 4, 6, 3) is ResNet-50."""
  num_classes: int
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  recalibration: ModuleDef | None = None
  zero_init_residual: bool = False
  scan_blocks: bool = False
  dtype: Any = jnp.float32
  impl: common.Implementation = common.Implementation()

  @nn.compact
  def __call__(self, x, train: bool = False):
    layers = common.Layers(self.impl, self.recalibration, self.dtype, train)
    x = layers.conv(self.width, (7, 7), 2, name="stem_conv")(x.astype(self.dtype))
    x = nn.relu(layers.norm(name="stem_bn")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, count in enumerate(self.stage_sizes):
      block = functools.partial(Bottleneck, width=self.width * 2 ** stage, layers=layers,
                                zero_init_last_bn=self.zero_init_residual)
      x = block(strides=1 if stage == 0 else 2, project=True, name=f"stage{stage + 1}_block1")(x)
      x = common.repeat_block(block, count - 1, x, f"stage{stage + 1}_blocks", self.scan_blocks)
    return common.classifier(x, self.num_classes, self.dtype)
