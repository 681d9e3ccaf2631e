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

Implementations. This file is the reference. On CPU, a block whose recalibration follows a
BatchNorm evaluates the same function with the BatchNorm folded into the pooling and the
gate (``backends.cpu.folded``): it calls this class's ``pool_cell`` and ``context``.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from mssar_jax import ops
from mssar_jax.errors import ConfigError
from mssar_jax.recalibration import common

WEIGHTINGS = ("asymmetric", "symmetric", "positional")
EVALUATIONS = ("pooled", "direct")
# How K_s starts: LeCun-normal weights (default), or zeros, so that the module starts as SE
# exactly and the local context grows from SE's score as training finds it useful.
CONTEXT_INITS = {"lecun_normal": nn.initializers.lecun_normal(),
                 "zeros": nn.initializers.zeros_init()}


class MultiScaleSAR(nn.Module):
  """MS-SAR: SE's bottleneck plus multi-scale, spatially asymmetric local context.

  Attributes:
    reduction: ratio r of the bottleneck C -> C/r.
    min_channels: floor on C/r.
    scales: cell sizes s of the coordinate sets; () gives SE exactly.
    kernel_size: k, the coordinate set is the k x k block of cells around the neuron's cell.
    weighting: 'asymmetric' (default), 'symmetric' or 'positional' (ablations).
    context_init: 'lecun_normal' (default) or 'zeros' (K_s starts at zero: SE at step 0).
    evaluation: 'pooled' (exact and cheap, default) or 'direct' (literal, full resolution).
    dtype: compute dtype (parameters stay ``param_dtype``, float32 by default).
    conv: the convolution module of K_s (a backend may inject a faster one).
  """
  reduction: float = 16
  min_channels: int = 4
  scales: Sequence[int] = (2, 4, 8)
  kernel_size: int = 3
  weighting: str = "asymmetric"
  context_init: str = "lecun_normal"
  evaluation: str = "pooled"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  conv: Any = nn.Conv

  def __post_init__(self):
    common.check_reduction(self.reduction, self.min_channels, "ms_sar")
    object.__setattr__(self, "scales", common.check_scales(self.scales, "ms_sar"))
    k = self.kernel_size
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
      raise ConfigError(f"ms_sar: kernel_size must be a positive odd integer (got {k!r}); "
                        "use e.g. kernel_size=3.")
    if self.weighting not in WEIGHTINGS:
      raise ConfigError(f"ms_sar: unknown weighting {self.weighting!r}; "
                        f"choose one of {', '.join(WEIGHTINGS)}.")
    if self.context_init not in CONTEXT_INITS:
      raise ConfigError(f"ms_sar: unknown context_init {self.context_init!r}; "
                        f"choose one of {', '.join(CONTEXT_INITS)}.")
    if self.evaluation not in EVALUATIONS:
      raise ConfigError(f"ms_sar: unknown evaluation {self.evaluation!r}; "
                        f"choose one of {', '.join(EVALUATIONS)}.")
    super().__post_init__()

  def pool_cell(self, height: int, width: int) -> tuple[int, int]:
    """The b x b cell (b = gcd of the scales) the score is computed on; SE's whole map
    when there are no scales."""
    if not self.scales:
      return height, width
    base = ops.common_base(self.scales)
    return base, base

  @nn.compact
  def __call__(self, x):
    channels = common.check_input(x, "ms_sar")
    height, width = x.shape[1], x.shape[2]
    self.check_map(height, width)
    reduce = common.DenseParams(common.reduced_channels(channels, self.reduction,
                                                        self.min_channels),
                                self.param_dtype, name="reduce")
    expand = common.DenseParams(channels, self.param_dtype, name="expand")
    if self.evaluation == "direct":
      z = common.dense(x, *reduce(x), self.dtype)
      h = jnp.mean(z.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(z.dtype)
      for s in self.scales:
        h = h + ops.upsample(self._scale_context(ops.cell_mean(z, s), s), s, height, width)
      cell = (1, 1)
    else:
      cell = self.pool_cell(height, width)
      means = ops.cell_mean(x.astype(jnp.float32), cell)
      h = self.context(common.dense(means, *reduce(means), self.dtype), height, width)
    score = common.excite(h, *expand(h), self.dtype)
    self.sow("intermediates", "score", score)
    return x * ops.upsample(score.astype(x.dtype), cell, height, width)

  def context(self, z_b, height: int, width: int):
    """h on the b-grid from z_b = Pool_b(z): GAP(z) + sum_s Up_{s/b}(K_s * Pool_s(z)),
    with Pool_s(z) = CellSum_{s/b}(n_b z_b) / n_s (module docstring)."""
    if not self.scales:
      return z_b
    base = ops.common_base(self.scales)
    mass = z_b.astype(jnp.float32) * ops.cell_counts(height, width, base)[None, :, :, None]
    h = (jnp.sum(mass, axis=(1, 2), keepdims=True) / (height * width)).astype(z_b.dtype)
    for s in self.scales:
      n_s = ops.cell_counts(height, width, s)[None, :, :, None]
      grid = (ops.cell_sum(mass, s // base) / n_s).astype(z_b.dtype)
      h = h + ops.upsample(self._scale_context(grid, s), s // base, z_b.shape[1], z_b.shape[2])
    return h

  def _scale_context(self, grid, s: int):
    """K_s applied to the pooled grid (N, gh, gw, C/r) of scale s (sown as 'scale_<s>')."""
    name, k, width = f"context_{s}", self.kernel_size, grid.shape[-1]
    init = CONTEXT_INITS[self.context_init]
    if self.weighting == "asymmetric":  # SAME padding, written out
      pad = ((k // 2, k // 2),) * 2
      ctx = self.conv(width, (k, k), padding=pad, use_bias=False, dtype=self.dtype,
                      param_dtype=self.param_dtype, kernel_init=init, name=name)(grid)
    elif self.weighting == "symmetric":
      uniform = nn.avg_pool(grid, (k, k), strides=(1, 1), padding="SAME")
      ctx = nn.Dense(width, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=init, name=name)(uniform)
    else:  # 'positional': every grid cell has its own 1x1 weights.
      ctx = _Positional(s, self.dtype, self.param_dtype, init, name=name)(grid)
    self.sow("intermediates", f"scale_{s}", ctx)
    return ctx

  def check_map(self, height: int, width: int) -> None:
    """ConfigError if a scale is larger than the feature map."""
    for s in self.scales:
      if s > min(height, width):
        where = "/".join(self.scope.path) if self.scope else "top level"
        fits = tuple(t for t in self.scales if t <= min(height, width)) or (1,)
        raise ConfigError(
            f"ms_sar at {where}: scale {s} is larger than the {height}x{width} feature map; "
            f"use scales no larger than {min(height, width)}, e.g. scales={fits}.")


class _Positional(nn.Module):
  """Unshared 1x1 weights (gh, gw, C/r, C/r) for each cell of a fixed grid."""
  scale: int
  dtype: Any
  param_dtype: Any
  kernel_init: Any

  @nn.compact
  def __call__(self, grid):
    gh, gw, width = grid.shape[1], grid.shape[2], grid.shape[3]
    if self.has_variable("params", "kernel"):
      stored = self.get_variable("params", "kernel").shape[:2]
      if stored != (gh, gw):
        raise ConfigError(
            f"ms_sar weighting='positional' at {'/'.join(self.scope.path)} was initialised for "
            f"a {stored[0]}x{stored[1]} grid at scale {self.scale} but got {gh}x{gw}; feed the "
            "input size used at initialisation or use weighting='asymmetric'.")
    kernel = self.param("kernel", self.kernel_init, (gh, gw, width, width), self.param_dtype)
    return jnp.einsum("nhwc,hwcd->nhwd", grid, kernel.astype(self.dtype))
