"""Squeeze-and-Excitation (Hu et al., CVPR 2018).

For x of shape (N, H, W, C) and bottleneck width C/r = max(min_channels, C // r):

    g     = GAP(x)                                   (N, 1, 1, C)
    score = sigmoid( W_e relu(g W_r + b_r) + b_e )   W_r: C x C/r, W_e: C/r x C
    y     = x * score                                (one score per channel)

Parameters: 2 * C * C/r + C/r + C. In the terms MS-SAR uses: the pooling cell is the whole
map and the context is the squeezed vector itself.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mssar_jax.recalibration import common


class SqueezeExcite(nn.Module):
  """SE block: channel scores from the global average, shared by every position.

  Attributes:
    reduction: ratio r of the bottleneck C -> C/r.
    min_channels: floor on C/r.
    dtype: compute dtype (parameters stay ``param_dtype``, float32 by default).
  """
  reduction: float = 16
  min_channels: int = 4
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    common.check_reduction(self.reduction, self.min_channels, "se")
    super().__post_init__()

  def pool_cell(self, height: int, width: int) -> tuple[int, int]:
    """The cell the input is averaged over before the squeeze: the whole map."""
    return height, width

  def context(self, z, height: int, width: int):  # pylint: disable=unused-argument
    """SE adds no spatial context: h = z."""
    return z

  @nn.compact
  def __call__(self, x):
    channels = common.check_input(x, "se")
    width = common.reduced_channels(channels, self.reduction, self.min_channels)
    g = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True)
    h = common.dense(g, *common.DenseParams(width, self.param_dtype, name="reduce")(g),
                     self.dtype)
    score = common.excite(h, *common.DenseParams(channels, self.param_dtype, name="expand")(h),
                          self.dtype)
    self.sow("intermediates", "score", score)
    return x * score.astype(x.dtype)
