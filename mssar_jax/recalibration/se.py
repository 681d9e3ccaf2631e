"""Squeeze-and-Excitation (Hu et al., CVPR 2018).

For x of shape (N, H, W, C) and bottleneck width C/r = max(min_channels, C // r):

    g     = GAP(x)                                   (N, 1, 1, C)
    score = sigmoid( W_e relu(g W_r + b_r) + b_e )   W_r: C x C/r, W_e: C/r x C
    y     = x * score                                (one score per channel)

Parameters: 2 * C * C/r + C/r + C.

Given the preceding BatchNorm module as ``norm``, SE recalibrates norm(x) with the
normalisation folded into its pooling and gate (``bn_fused``; same function).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mssar_jax.recalibration import bn_fused, common


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

  @nn.compact
  def __call__(self, x, norm=None):
    """Recalibrates x or, given the preceding BatchNorm module as ``norm``, norm(x) (fused:
    the normalisation is applied inside the pooling and the gate, ``bn_fused``)."""
    channels = common.check_input(x, "se")
    width = common.reduced_channels(channels, self.reduction, self.min_channels)
    reduce = common.DenseParams(width, param_dtype=self.param_dtype, name="reduce")
    expand = common.DenseParams(channels, param_dtype=self.param_dtype, name="expand")
    whole_map = tuple(x.shape[1:3])
    if norm is not None:
      means, a, b = norm(x, pool_cell=whole_map)  # norm(x) = x a + b
      h = bn_fused.squeeze(means, a, b, *reduce(means), self.dtype)
    else:
      g = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True)
      h = common.dense(g, *reduce(g), self.dtype)
    kernel, bias = expand(h)
    if norm is not None:
      out, score = bn_fused.excite_and_gate(x, a, b, h, kernel, bias, whole_map)
      self.sow("intermediates", "score", score)
      return out
    score = common.excite(h, kernel, bias, self.dtype)
    self.sow("intermediates", "score", score)
    return x * score.astype(x.dtype)
