"""A recalibration fused with the BatchNorm before it: the normalised map is never formed.

A block's last BatchNorm is, per channel, y = x a + b (a = scale / sqrt(var + eps),
b = bias - mean a, batch statistics of the conv output x). The recalibration pools y over
cells of s x s pixels (MS-SAR: s = the gcd of its scales; SE: s = the whole map), computes
one score per cell and returns y Up_s(score). Two functions with hand-written gradients do
that from x, so y is never written to memory and the gradient makes the passes a BatchNorm
alone would make (M elements per channel, n = s * s, CellSum over each cell):

``pool_and_stats(x)`` -> (m, mean, var), m = CellSum(x) / n, so CellMean(y) = m a + b:

    dx = Up(dm) / n + (dmean - 2 mean dvar) / M + x 2 dvar / M

``excite_and_gate(x, a, b, h, W, c)`` -> out = y Up(s), s = sigmoid(relu(h) W + c) per cell:

    Q1 = CellSum(g),  Q2 = CellSum(g x)           (g = d out; a quarter of g's size for 2x2)
    dp = (a Q2 + b Q1 + ds) s (1 - s)             (ds = d score, dp = d(relu(h) W + c))
    dh = [h > 0] dp W^T,  dW = relu(h)^T dp,  dc = sum dp
    da = sum(s Q2),  db = sum(s Q1),  dx = g Up(s a)

so the full-resolution work is two cell sums and dx. Autodiff of the unfused version writes
y, the upsampled score and the score's gradient at full resolution, and sums them separately.

On XLA:CPU with one device, 2x2 cells and float32 (``native.gate_kernels.usable``) the
forward pooling + statistics, the squeeze and its gradient, the excitation, and everything
in the gate's backward but dx run as hand-written kernels, one pass each; the jnp code below
is the reference and the fallback.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mssar_jax.native import gate_kernels
from mssar_jax.recalibration import common


def _up(grid, cell, shape):
  """Nearest upsampling of grid (N, H/sh, W/sw, C) to ``shape`` (N, H, W, C)."""
  return common.upsample(grid, cell, shape[1], shape[2])


def supports(shape, cell) -> bool:
  """Whether the fused functions apply: the cells tile the (H, W) map exactly."""
  return shape[1] % cell[0] == 0 and shape[2] % cell[1] == 0


def batch_stats(x):
  """Per-channel mean and (biased) variance over all axes but the last, float32: the mean
  of x and the mean of x^2 minus mean^2, clipped at 0 (flax's BatchNorm's formula). Shared
  with ``models.batch_norm``, so both paths give the same running averages.
  """
  axes = tuple(range(x.ndim - 1))
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axes)
  var = jnp.maximum(jnp.mean(jnp.square(xf), axes) - jnp.square(mean), 0.0)
  return mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def pool_and_stats(x, cell):
  """(CellMean_cell(x), mean, var): x's cell means and its per-channel batch statistics."""
  return _pool_and_stats_fwd(x, cell)[0]


def _pool_and_stats_fwd(x, cell):
  if gate_kernels.usable(x, cell):
    means, mean, var = gate_kernels.pool_stats(x)
  else:
    mean, var = batch_stats(x)
    means = common.cell_sum(x.astype(jnp.float32), cell) / (cell[0] * cell[1])
  return (means, mean, var), (x, mean, var)


def _pool_and_stats_bwd(cell, residuals, cotangents):
  x, mean, var = residuals
  d_means, d_mean, d_var = cotangents
  m = x.size // x.shape[-1]
  d_var = jnp.where(var > 0, d_var, 0.0)  # var was clipped at 0 there
  dx = (_up(d_means / (cell[0] * cell[1]), cell, x.shape)
        + x.astype(jnp.float32) * (2.0 * d_var / m) + (d_mean - 2.0 * mean * d_var) / m)
  return (dx.astype(x.dtype),)


pool_and_stats.defvjp(_pool_and_stats_fwd, _pool_and_stats_bwd)


def squeeze(means, a, b, kernel, bias, dtype):
  """dense(means a + b, kernel, bias): the squeeze on the cells' means of y = x a + b.

  With the kernels (``gate_kernels.usable``) a hand-written forward and backward
  (dm = (dz W^T) a, dW = (m a + b)^T dz, da = sum m (dz W^T), db = sum dz W^T, dc = sum dz);
  else ``common.dense_after_affine`` and autodiff.
  """
  if jnp.dtype(dtype) == jnp.float32 and gate_kernels.usable(means):
    return _squeeze(means, a, b, kernel.astype(jnp.float32), bias.astype(jnp.float32))
  return common.dense_after_affine(means, a, b, kernel, bias, dtype)


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


def _gate(x, a, b, score, cell):
  y = x.astype(jnp.float32) * a + b
  return (y * _up(score, cell, x.shape)).astype(x.dtype)


def excite_and_gate(x, a, b, h, kernel, bias, cell):
  """(out, score): score = sigmoid(relu(h) kernel + bias) per cell, out = (x a + b) Up(score).

  x: (N, H, W, C); a, b: (C,) float32; h: (N, H/sh, W/sw, K); kernel: (K, C); bias: (C,).
  The excitation is computed in float32; ``out`` is in x's dtype, ``score`` in float32.
  """
  f32 = lambda v: v.astype(jnp.float32)
  return _excite_and_gate(x, a, b, f32(h), f32(kernel), f32(bias), tuple(cell))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _excite_and_gate(x, a, b, h, kernel, bias, cell):
  return _excite_and_gate_fwd(x, a, b, h, kernel, bias, cell)[0]


def _excite_and_gate_fwd(x, a, b, h, kernel, bias, cell):
  if gate_kernels.usable(x, cell):
    score = gate_kernels.excite(h, kernel, bias)
  else:
    score = jax.nn.sigmoid(jnp.dot(jax.nn.relu(h), kernel) + bias)
  return (_gate(x, a, b, score, cell), score), (x, a, b, h, kernel, score)


def _excite_and_gate_bwd(cell, residuals, cotangents):
  x, a, b, h, kernel, score = residuals
  g, g_score = cotangents
  g = g.astype(jnp.float32)
  dx = g * _up(score * a, cell, x.shape)
  if gate_kernels.usable(x, cell):
    dh, dkernel, dbias, da, db = gate_kernels.gate_backward(g, x, a, b, h, kernel, score, g_score)
    return dx.astype(x.dtype), da, db, dh, dkernel, dbias
  xf = x.astype(jnp.float32)
  # Everything but dx from two cell sums (a quarter of the activations each for 2x2 cells).
  q1, q2 = common.cell_sum(g, cell), common.cell_sum(g * xf, cell)
  dp = (a * q2 + b * q1 + g_score) * (score * (1.0 - score))  # d pre-sigmoid
  axes = tuple(range(h.ndim - 1))
  dh = jnp.where(h > 0, jnp.dot(dp, kernel.T), 0.0)
  dkernel = jnp.tensordot(jax.nn.relu(h), dp, axes=(axes, axes))
  da, db = jnp.sum(score * q2, axes), jnp.sum(score * q1, axes)
  return dx.astype(x.dtype), da, db, dh, dkernel, jnp.sum(dp, axes)


_excite_and_gate.defvjp(_excite_and_gate_fwd, _excite_and_gate_bwd)
