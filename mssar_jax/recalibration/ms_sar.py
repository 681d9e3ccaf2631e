"""Multi-Scale Spatially-Asymmetric Recalibration (MS-SAR; Wang et al., ECCV 2018).

This is this project's reading of the method (see README, "The MS-SAR reading"). For x of
shape (N, H, W, C), bottleneck width C/r = max(min_channels, C // r) and scales S:

    z     = x W_r + b_r                                  1x1, C -> C/r (SE's squeeze), per position
    h     = GAP(z) + sum_{s in S} Up_s( K_s * Pool_s(z) )
    score = sigmoid( W_e relu(h) + b_e )                  1x1, C/r -> C (SE's excitation)
    y     = x * score                                     one score per position and channel

* Pool_s averages z over non-overlapping s x s cells, a grid of ceil(H/s) x ceil(W/s) cells;
  edge cells of sizes not divisible by s average the pixels they cover.
* K_s is a k x k convolution on that grid (SAME zero padding, no bias, C/r -> C/r). Its k*k
  taps are the spatially asymmetric weights: one weight matrix per relative position in the
  neuron's coordinate set, the k x k block of cells around its own cell, i.e. a (k*s) x (k*s)
  region of the feature map.
* Up_s copies each cell's value back to its s x s pixels (nearest neighbour).
* With S = () the module is exactly SE (same parameter names: ``reduce`` and ``expand``).

Parameters: SE's 2*C*C/r + C/r + C plus, per scale,
  'asymmetric': k*k*(C/r)^2      (K_s)
  'symmetric':  (C/r)^2          (uniform k x k average of the grid, then a learned 1x1)
  'positional': gh*gw*(C/r)^2    (unshared 1x1 weights for each of the gh x gw grid cells;
                                  needs the input size used at initialisation)

Evaluation. ``evaluation='pooled'`` (default) is exact and cheap: with b = gcd(S), every
s-cell is a union of b-cells, pooling commutes with the affine squeeze, and h is constant on
each b-cell. So z, h and the score are computed on the b x b pooled map,

    z_b = Pool_b(x) W_r + b_r,   Pool_s(z) = CellSum_{s/b}(n_b * z_b) / n_s,
    GAP(z) = sum(n_b * z_b) / (H W)       (n_b, n_s: pixels covered by each cell),

and the score is upsampled once; only the final multiply runs at full resolution.
``evaluation='direct'`` runs the equations above literally at full resolution (reference).

After a BatchNorm (``x = BN(conv) = conv * a + b``), a block passes the BatchNorm module as
``norm`` and the pooled evaluation folds it in (``bn_fused``): Pool_b(x) W_r + b_r =
Pool_b(conv) (diag(a) W_r) + (b W_r + b_r), and the gate is (conv * a + b) * Up_b(score),
with hand-written gradients. The same function; the normalised map is never in memory.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from mssar_jax.errors import ConfigError
from mssar_jax.native import onednn_conv
from mssar_jax.recalibration import bn_fused, common

WEIGHTINGS = ("asymmetric", "symmetric", "positional")
EVALUATIONS = ("pooled", "direct")


def extra_parameters(channels: int, reduction: float = 16, min_channels: int = 4,
                     scales: Sequence[int] = (2, 4, 8), kernel_size: int = 3,
                     weighting: str = "asymmetric", grid_cells: Sequence[int] | None = None) -> int:
  """Parameters MS-SAR adds over SE for a C-channel layer (the docstring formula).

  ``grid_cells`` (gh*gw per scale) is needed only for ``weighting='positional'``.
  """
  width = common.reduced_channels(channels, reduction, min_channels)
  if weighting == "asymmetric":
    return len(scales) * kernel_size * kernel_size * width * width
  if weighting == "symmetric":
    return len(scales) * width * width
  if grid_cells is None:
    raise ConfigError("extra_parameters: weighting='positional' needs grid_cells (gh*gw per scale).")
  return sum(grid_cells) * width * width


def se_parameters(channels: int, reduction: float = 16, min_channels: int = 4) -> int:
  """Parameters of an SE block on C channels: 2*C*C/r + C/r + C."""
  width = common.reduced_channels(channels, reduction, min_channels)
  return 2 * channels * width + width + channels


class MultiScaleSAR(nn.Module):
  """MS-SAR: SE's bottleneck plus multi-scale, spatially asymmetric local context.

  Attributes:
    reduction: ratio r of the bottleneck C -> C/r.
    min_channels: floor on C/r.
    scales: cell sizes s of the coordinate sets; () gives SE exactly.
    kernel_size: k, the coordinate set is the k x k block of cells around the neuron's cell.
    weighting: 'asymmetric' (default), 'symmetric' or 'positional' (ablations).
    evaluation: 'pooled' (exact and cheap, default) or 'direct' (literal, full resolution).
    dtype: compute dtype (parameters stay ``param_dtype``, float32 by default).
  """
  reduction: float = 16
  min_channels: int = 4
  scales: Sequence[int] = (2, 4, 8)
  kernel_size: int = 3
  weighting: str = "asymmetric"
  evaluation: str = "pooled"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    common.check_reduction(self.reduction, self.min_channels, "ms_sar")
    common.check_scales(self.scales, "ms_sar")
    k = self.kernel_size
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
      raise ConfigError(f"ms_sar: kernel_size must be a positive odd integer (got {k!r}); "
                        "use e.g. kernel_size=3.")
    if self.weighting not in WEIGHTINGS:
      raise ConfigError(f"ms_sar: unknown weighting {self.weighting!r}; "
                        f"choose one of {', '.join(WEIGHTINGS)}.")
    if self.evaluation not in EVALUATIONS:
      raise ConfigError(f"ms_sar: unknown evaluation {self.evaluation!r}; "
                        f"choose one of {', '.join(EVALUATIONS)}.")
    super().__post_init__()

  def _dense(self, features, name, use_bias=True):
    return nn.Dense(features, use_bias=use_bias, dtype=self.dtype,
                    param_dtype=self.param_dtype, name=name)

  def _context(self, grid, s: int, width: int):
    """K_s applied to the pooled grid (N, gh, gw, C/r) of scale s."""
    name = f"context_{s}"
    k = self.kernel_size
    if self.weighting == "asymmetric":
      r = k // 2  # SAME padding, explicit (the oneDNN kernels take explicit padding)
      return nn.Conv(width, (k, k), padding=((r, r), (r, r)), use_bias=False, dtype=self.dtype,
                     param_dtype=self.param_dtype, name=name,
                     **onednn_conv.nn_conv_kwargs(self.dtype))(grid)
    if self.weighting == "symmetric":
      uniform = nn.avg_pool(grid, (k, k), strides=(1, 1), padding="SAME")
      return self._dense(width, name, use_bias=False)(uniform)
    # 'positional': every grid cell has its own 1x1 weights.
    gh, gw = grid.shape[1], grid.shape[2]
    if self.has_variable("params", name):
      stored = self.get_variable("params", name).shape[:2]
      if stored != (gh, gw):
        raise ConfigError(
            f"ms_sar weighting='positional' at {'/'.join(self.scope.path)} was initialised for a "
            f"{stored[0]}x{stored[1]} grid at scale {s} but got {gh}x{gw}; feed the input size "
            "used at initialisation or use weighting='asymmetric'.")
    kernel = self.param(name, nn.initializers.lecun_normal(in_axis=-2, out_axis=-1),
                        (gh, gw, width, width), self.param_dtype)
    return jnp.einsum("nhwc,hwcd->nhwd", grid, kernel.astype(self.dtype))

  def _check_map(self, height: int, width: int, scales):
    for s in scales:
      if s > min(height, width):
        where = "/".join(self.scope.path) or "top level"
        fits = tuple(t for t in scales if t <= min(height, width)) or (1,)
        raise ConfigError(
            f"ms_sar at {where}: scale {s} is larger than the {height}x{width} feature map; "
            f"use scales no larger than {min(height, width)}, e.g. scales={fits}.")

  @nn.compact
  def __call__(self, x, norm=None):
    """Recalibrates x or, given the preceding BatchNorm module as ``norm``, norm(x).

    With ``norm`` and the pooled evaluation, the normalisation is applied inside the pooling
    and the gate (``bn_fused``): the same function, without norm(x) in memory.
    """
    channels = common.check_input(x, "ms_sar")
    n, height, width_px, _ = x.shape
    scales = common.check_scales(self.scales, "ms_sar")
    self._check_map(height, width_px, scales)
    width = common.reduced_channels(channels, self.reduction, self.min_channels)
    reduce_params = common.DenseParams(width, param_dtype=self.param_dtype, name="reduce")
    expand = common.DenseParams(channels, param_dtype=self.param_dtype, name="expand")
    base = common.common_base(scales) if scales else None
    cell = (base, base) if scales else (height, width_px)
    fused = (norm is not None and self.evaluation == "pooled"
             and bn_fused.supports(x.shape, cell))
    if fused:
      means, a, b = norm(x, pool_cell=cell)  # norm(x) = x a + b
    elif norm is not None:
      x = norm(x)
    x32 = x.astype(jnp.float32)

    def reduce(v):  # W_r v + b_r (SE's squeeze)
      return common.dense(v, *reduce_params(v), self.dtype)

    def reduce_pooled():  # W_r CellMean_cell(input) + b_r
      if fused:
        kernel, bias = reduce_params(means)
        return bn_fused.squeeze(means, a, b, kernel, bias, self.dtype)
      if not scales:
        return reduce(jnp.mean(x32, axis=(1, 2), keepdims=True))
      return reduce(common.cell_mean(x32, base))

    def excite_and_gate(h):  # score = sigmoid(W_e relu(h) + b_e), then x * Up_cell(score)
      kernel, bias = expand(h)
      if fused:
        out, score = bn_fused.excite_and_gate(x, a, b, h, kernel, bias, cell)
        self.sow("intermediates", "score", score)
        return out
      score = common.excite(h, kernel, bias, self.dtype)
      self.sow("intermediates", "score", score)
      if not scales or self.evaluation == "direct":  # score has x's (or a 1 x 1) grid
        return x * score.astype(x.dtype)
      return common.multiply_by_cells(x, score.astype(x.dtype), base)

    if not scales:  # SE exactly.
      return excite_and_gate(reduce_pooled())

    if self.evaluation == "direct":
      z = reduce(x.astype(self.dtype))
      h = jnp.mean(z.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(z.dtype)
      for s in scales:
        ctx = self._context(common.cell_mean(z, s), s, width)
        self.sow("intermediates", f"scale_{s}", ctx)
        h = h + common.upsample(ctx, s, height, width_px)
      return excite_and_gate(h)

    n_b = jnp.asarray(common.cell_counts(height, width_px, base))[None, :, :, None]
    z_b = reduce_pooled()  # = Pool_b(z)
    mass = z_b.astype(jnp.float32) * n_b
    h = (jnp.sum(mass, axis=(1, 2), keepdims=True) / (height * width_px)).astype(z_b.dtype)
    gh_b, gw_b = z_b.shape[1], z_b.shape[2]
    for s in scales:
      m = s // base
      n_s = jnp.asarray(common.cell_counts(height, width_px, s))[None, :, :, None]
      grid = (common.cell_sum(mass, m) / n_s).astype(z_b.dtype)  # = Pool_s(z)
      ctx = self._context(grid, s, width)
      self.sow("intermediates", f"scale_{s}", ctx)
      h = h + common.upsample(ctx, m, gh_b, gw_b)
    return excite_and_gate(h)  # the score is computed on the b-grid
