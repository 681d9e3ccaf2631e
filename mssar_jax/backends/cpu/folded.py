"""SE / MS-SAR after a BatchNorm, with the BatchNorm folded in: the normalised map is never
formed. An implementation of ``models.common.norm_then_recalibrate`` (same function, same
variables) that the CPU backend hands to the networks.

A block's last BatchNorm is, per channel, y = x a + b (a = scale / sqrt(var + eps),
b = bias - mean a, batch statistics of the conv output x). The recalibration pools y over
cells of s x s pixels (its ``pool_cell``: MS-SAR the gcd of its scales, SE the whole map),
computes one score per cell and returns y Up_s(score). Three functions with hand-written
gradients do that from x (M elements per channel, n = s * s, CellSum over each cell):

``pool_and_stats(x)`` -> (m, mean, var), m = CellSum(x) / n, so CellMean(y) = m a + b:

    dx = Up(dm) / n + (dmean - 2 mean dvar) / M + x 2 dvar / M

``squeeze(m, a, b, W, c)`` = (m a + b) W + c, with the affine folded into the weights.

``excite_and_gate(x, a, b, h, W, c)`` -> out = y Up(s), s = sigmoid(relu(h) W + c) per cell:

    Q1 = CellSum(g),  Q2 = CellSum(g x)           (g = d out; a quarter of g's size for 2x2)
    dp = (a Q2 + b Q1 + ds) s (1 - s)             (ds = d score, dp = d(relu(h) W + c))
    dh = [h > 0] dp W^T,  dW = relu(h)^T dp,  dc = sum dp
    da = sum(s Q2),  db = sum(s Q1),  dx = g Up(s a)

so the full-resolution work is two cell sums and dx; autodiff of the composition writes y, the
upsampled score and the score's gradient at full resolution. The recalibration's own middle
(MS-SAR's multi-scale context) is its reference ``context`` method, run unchanged.

With ``kernels=True`` (float32, 2x2 cells, C a multiple of 16 up to 256: ``gate_kernels.fits``)
the pooling + statistics, the squeeze and its gradient, the excitation and the gate's backward
but dx run as hand-written CPU kernels (``gate_kernels``); the jnp code here is their reference.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mssar_jax import ops
from mssar_jax.backends.cpu import gate_kernels
from mssar_jax.backends.cpu.batch_norm import batch_norm_variables, update_running_averages
from mssar_jax.models.common import norm_then_recalibrate
from mssar_jax.recalibration import common
from mssar_jax.recalibration.ms_sar import MultiScaleSAR
from mssar_jax.recalibration.se import SqueezeExcite


# ---------------------------------------------------------------------------------------------
# Cell sums and upsampling in the forms XLA:CPU runs fastest (maps that the cells tile).

def _cell_sum(x, cell):
  sh, sw = cell
  if (sh, sw) == (2, 2):  # four strided slices: one elementwise pass, ~2x a reshape-reduce
    return x[:, 0::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 0::2] + x[:, 1::2, 1::2]
  if (sh, sw) == tuple(x.shape[1:3]):  # the whole map
    return jnp.sum(x, axis=(1, 2), keepdims=True)
  n, h, w, c = x.shape
  return x.reshape(n, h // sh, sh, w // sw, sw, c).sum(axis=(2, 4))


def _up(grid, cell, shape):
  """Nearest upsampling of grid (N, H/sh, W/sw, C) to ``shape`` (N, H, W, C)."""
  n, gh, gw, c = grid.shape
  sh, sw = cell
  grid = jnp.broadcast_to(grid[:, :, None, :, None, :], (n, gh, sh, gw, sw, c))
  return grid.reshape(shape[:3] + (c,))


def tiles(shape, cell) -> bool:
  """Whether the cells tile the (H, W) map exactly (else the reference composition runs)."""
  return shape[1] % cell[0] == 0 and shape[2] % cell[1] == 0


# ---------------------------------------------------------------------------------------------
# The three folded functions.

@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def pool_and_stats(x, cell, kernels: bool = False):
  """(CellMean_cell(x), mean, var): x's cell means and its per-channel batch statistics."""
  return _pool_and_stats_fwd(x, cell, kernels)[0]


def _pool_and_stats_fwd(x, cell, kernels):
  if kernels and gate_kernels.fits(x, cell):
    means, mean, var = gate_kernels.pool_stats(x)
  else:
    mean, var = ops.batch_stats(x)
    means = _cell_sum(x.astype(jnp.float32), cell) / (cell[0] * cell[1])
  return (means, mean, var), (x, mean, var)


def _pool_and_stats_bwd(cell, kernels, residuals, cotangents):
  del kernels
  x, mean, var = residuals
  d_means, d_mean, d_var = cotangents
  m = x.size // x.shape[-1]
  d_var = jnp.where(var > 0, d_var, 0.0)  # var was clipped at 0 there
  dx = (_up(d_means / (cell[0] * cell[1]), cell, x.shape)
        + x.astype(jnp.float32) * (2.0 * d_var / m) + (d_mean - 2.0 * mean * d_var) / m)
  return (dx.astype(x.dtype),)


pool_and_stats.defvjp(_pool_and_stats_fwd, _pool_and_stats_bwd)


def squeeze(means, a, b, kernel, bias, dtype, kernels: bool = False):
  """(means a + b) kernel + bias, the squeeze on the cells' means of y = x a + b, with the
  affine folded into the weights: means (a kernel) + (b kernel + bias)."""
  if kernels and jnp.dtype(dtype) == jnp.float32 and gate_kernels.fits(means):
    return _squeeze(means, a, b, kernel.astype(jnp.float32), bias.astype(jnp.float32))
  folded = a[:, None] * kernel.astype(jnp.float32)
  shift = b @ kernel.astype(jnp.float32) + bias.astype(jnp.float32)
  return common.dense(means, folded, shift, dtype)


@jax.custom_vjp
def _squeeze(means, a, b, kernel, bias):
  return gate_kernels.squeeze(means, a, b, kernel, bias)


def _squeeze_fwd(means, a, b, kernel, bias):
  return _squeeze(means, a, b, kernel, bias), (means, a, b, kernel)


def _squeeze_bwd(residuals, dz):
  means, a, b, kernel = residuals
  dm, dkernel, dbias, da, db = gate_kernels.squeeze_backward(means, a, b, kernel, dz)
  return dm, da, db, dkernel, dbias


_squeeze.defvjp(_squeeze_fwd, _squeeze_bwd)


def excite_and_gate(x, a, b, h, kernel, bias, cell, kernels: bool = False):
  """(out, score): score = sigmoid(relu(h) kernel + bias) per cell, out = (x a + b) Up(score).

  x: (N, H, W, C); a, b: (C,) float32; h: (N, H/sh, W/sw, K); kernel: (K, C); bias: (C,).
  The excitation is computed in float32; ``out`` is in x's dtype, ``score`` in float32.
  """
  f32 = lambda v: v.astype(jnp.float32)
  return _excite_and_gate(x, a, b, f32(h), f32(kernel), f32(bias), tuple(cell),
                          kernels and gate_kernels.fits(x, cell))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _excite_and_gate(x, a, b, h, kernel, bias, cell, kernels):
  return _excite_and_gate_fwd(x, a, b, h, kernel, bias, cell, kernels)[0]


def _excite_and_gate_fwd(x, a, b, h, kernel, bias, cell, kernels):
  if kernels:
    score = gate_kernels.excite(h, kernel, bias)
  else:
    score = jax.nn.sigmoid(jnp.dot(jax.nn.relu(h), kernel) + bias)
  out = ((x.astype(jnp.float32) * a + b) * _up(score, cell, x.shape)).astype(x.dtype)
  return (out, score), (x, a, b, h, kernel, score)


def _excite_and_gate_bwd(cell, kernels, residuals, cotangents):
  x, a, b, h, kernel, score = residuals
  g, g_score = cotangents
  g = g.astype(jnp.float32)
  dx = (g * _up(score * a, cell, x.shape)).astype(x.dtype)
  if kernels:
    dh, dkernel, dbias, da, db = gate_kernels.gate_backward(g, x, a, b, h, kernel, score, g_score)
    return dx, da, db, dh, dkernel, dbias
  # Everything but dx from two cell sums (a quarter of the activations each for 2x2 cells).
  q1, q2 = _cell_sum(g, cell), _cell_sum(g * x.astype(jnp.float32), cell)
  dp = (a * q2 + b * q1 + g_score) * (score * (1.0 - score))  # d pre-sigmoid
  axes = tuple(range(h.ndim - 1))
  dh = jnp.where(h > 0, jnp.dot(dp, kernel.T), 0.0)
  dkernel = jnp.tensordot(jax.nn.relu(h), dp, axes=(axes, axes))
  da, db = jnp.sum(score * q2, axes), jnp.sum(score * q1, axes)
  return dx, da, db, dh, dkernel, jnp.sum(dp, axes)


_excite_and_gate.defvjp(_excite_and_gate_fwd, _excite_and_gate_bwd)


# ---------------------------------------------------------------------------------------------
# Modules: the BatchNorm as (cell means, a, b), and the recalibrations that take them.

class FoldedBatchNorm(nn.Module):
  """nn.BatchNorm's variables and running averages, but returns (m, a, b), all float32, with
  BN(x) = x a + b per channel and m the cell means of x, instead of BN(x)."""
  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  param_dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros
  kernels: bool = False

  @nn.compact
  def __call__(self, x, cell):
    ra_mean, ra_var, scale, bias = batch_norm_variables(self, x.shape[-1])
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
      means = _cell_sum(x.astype(jnp.float32), cell) / math.prod(cell)
    else:
      means, mean, var = pool_and_stats(x, tuple(cell), self.kernels)
      update_running_averages(self, ra_mean, ra_var, mean, var)
    a = jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)
    return means, a, bias.astype(jnp.float32) - mean * a


def _recalibrate(module, x, means, a, b):
  """The recalibration ``module`` (SE or MS-SAR fields, their parameter names) of x a + b."""
  channels, (height, width) = x.shape[-1], x.shape[1:3]
  reduced = common.reduced_channels(channels, module.reduction, module.min_channels)
  kernel, bias = common.DenseParams(reduced, module.param_dtype, name="reduce")(means)
  h = module.context(squeeze(means, a, b, kernel, bias, module.dtype, module.kernels),
                     height, width)
  kernel, bias = common.DenseParams(channels, module.param_dtype, name="expand")(h)
  out, score = excite_and_gate(x, a, b, h, kernel, bias, module.pool_cell(height, width),
                               module.kernels)
  module.sow("intermediates", "score", score)
  return out


class FoldedSqueezeExcite(SqueezeExcite):
  kernels: bool = False

  @nn.compact
  def __call__(self, x, means, a, b):  # pylint: disable=arguments-differ
    return _recalibrate(self, x, means, a, b)


class FoldedMultiScaleSAR(MultiScaleSAR):
  kernels: bool = False

  @nn.compact
  def __call__(self, x, means, a, b):  # pylint: disable=arguments-differ
    self.check_map(x.shape[1], x.shape[2])
    return _recalibrate(self, x, means, a, b)


FOLDED = {SqueezeExcite: FoldedSqueezeExcite, MultiScaleSAR: FoldedMultiScaleSAR}


def norm_recalibrate(norm, recalibration, y, *, kernels: bool = False, **norm_kwargs):
  """recalibration(norm(y)) with the BatchNorm folded in where it applies (the pooled
  evaluation of a registered recalibration on a map its cells tile); else the reference."""
  folded_cls = FOLDED.get(getattr(recalibration, "func", None))
  fields = getattr(recalibration, "keywords", {})
  if folded_cls is None or fields.get("evaluation", "pooled") != "pooled":
    return norm_then_recalibrate(norm, recalibration, y, **norm_kwargs)
  cell = folded_cls(**fields, parent=None).pool_cell(y.shape[1], y.shape[2])
  if not tiles(y.shape, cell):
    return norm_then_recalibrate(norm, recalibration, y, **norm_kwargs)
  bn = norm(parent=None, **norm_kwargs)  # detached: only its settings are read
  means, a, b = FoldedBatchNorm(
      use_running_average=bn.use_running_average, momentum=bn.momentum, epsilon=bn.epsilon,
      param_dtype=bn.param_dtype, scale_init=bn.scale_init, bias_init=bn.bias_init,
      kernels=kernels, name=bn.name)(y, cell)
  return folded_cls(**fields, kernels=kernels, name="recalibration")(y, means, a, b)
