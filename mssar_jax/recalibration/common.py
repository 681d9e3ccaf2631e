"""Helpers shared by the recalibration modules: argument checks and s x s cell pooling.

Cell pooling splits an (H, W) map into a grid of ceil(H/s) x ceil(W/s) non-overlapping
s x s cells. Edge cells of a size that is not a multiple of s are smaller, and their
average is taken over the pixels they actually cover.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mssar_jax.errors import ConfigError


class DenseParams(nn.Module):
  """The parameters of ``nn.Dense(features)`` ('kernel' (K, features), 'bias'), same names,
  shapes and initialisers, returned instead of applied (for fused excitations)."""
  features: int
  param_dtype: object = jnp.float32

  @nn.compact
  def __call__(self, h):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (h.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    return kernel, bias


def dense(v, kernel, bias, dtype):
  """v kernel + bias over the last axis, computed in ``dtype`` (nn.Dense's maths)."""
  v = v.astype(dtype)
  y = jax.lax.dot_general(v, kernel.astype(dtype), (((v.ndim - 1,), (0,)), ((), ())))
  return y + bias.astype(dtype)


def dense_after_affine(m, a, b, kernel, bias, dtype):
  """dense(m * a + b, kernel, bias) with the per-channel affine folded into the weights:
  m (a kernel) + (b kernel + bias), so m * a + b is never formed at m's size."""
  folded = a[:, None] * kernel.astype(jnp.float32)
  shift = b @ kernel.astype(jnp.float32) + bias.astype(jnp.float32)
  return dense(m, folded, shift, dtype)


def excite(h, kernel, bias, dtype):
  """sigmoid(relu(h) kernel + bias) computed in ``dtype``, as nn.Dense then sigmoid would."""
  return jax.nn.sigmoid(dense(jax.nn.relu(h), kernel, bias, dtype))


def reduced_channels(channels: int, reduction: float, min_channels: int) -> int:
  """Bottleneck width C/r, floored at ``min_channels`` so 12- and 16-channel layers work."""
  return max(int(min_channels), int(channels // reduction))


def check_reduction(reduction, min_channels, owner: str) -> None:
  if not isinstance(reduction, (int, float)) or isinstance(reduction, bool) or reduction <= 0:
    raise ConfigError(f"{owner}: reduction must be a positive number (got {reduction!r}); "
                      "use e.g. reduction=16.")
  if not isinstance(min_channels, int) or min_channels < 1:
    raise ConfigError(f"{owner}: min_channels must be a positive integer (got {min_channels!r}); "
                      "use e.g. min_channels=4.")


def check_input(x, owner: str) -> int:
  """Checks x is (N, H, W, C) with C > 0 and returns C."""
  if x.ndim != 4:
    raise ConfigError(f"{owner}: expects NHWC input of rank 4, got shape {tuple(x.shape)}; "
                      "pass images as (batch, height, width, channels).")
  channels = x.shape[-1]
  if channels == 0:
    raise ConfigError(f"{owner}: input has 0 channels (shape {tuple(x.shape)}); "
                      "recalibration needs at least one channel.")
  return channels


def check_scales(scales: Sequence[int], owner: str) -> tuple[int, ...]:
  try:
    scales = tuple(scales)
  except TypeError:
    raise ConfigError(f"{owner}: scales must be a sequence of positive integers "
                      f"(got {scales!r}); use e.g. scales=(2, 4, 8).") from None
  for s in scales:
    if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1:
      raise ConfigError(f"{owner}: every scale must be a positive integer (got {scales!r}); "
                        "use e.g. scales=(2, 4, 8).")
  if len(set(scales)) != len(scales):
    raise ConfigError(f"{owner}: scales must be distinct (got {scales!r}); drop the repeats.")
  return tuple(int(s) for s in scales)


def grid_size(size: int, s: int) -> int:
  return -(-size // s)


def cell_counts(height: int, width: int, s: int) -> np.ndarray:
  """Pixels covered by each cell of the s x s grid, shape (ceil(H/s), ceil(W/s)), float32."""
  def along(size):
    n = grid_size(size, s)
    counts = np.full((n,), s, dtype=np.float32)
    counts[-1] = size - s * (n - 1)
    return counts
  return np.outer(along(height), along(width)).astype(np.float32)


def _pair(s):
  return (s, s) if isinstance(s, (int, np.integer)) else tuple(s)


def cell_sum(x, s):
  """Sum of x (N, H, W, C) over each s x s cell (or sh x sw for s = (sh, sw)):
  (N, ceil(H/sh), ceil(W/sw), C)."""
  sh, sw = _pair(s)
  if (sh, sw) == (1, 1):
    return x
  n, h, w, c = x.shape
  gh, gw = grid_size(h, sh), grid_size(w, sw)
  if gh * sh != h or gw * sw != w:
    x = jnp.pad(x, ((0, 0), (0, gh * sh - h), (0, gw * sw - w), (0, 0)))
  if (sh, sw) == (2, 2):  # four strided slices: one elementwise pass on XLA:CPU, ~2x a reshape-reduce
    return x[:, 0::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 0::2] + x[:, 1::2, 1::2]
  if (gh, gw) == (1, 1):  # the whole map
    return jnp.sum(x, axis=(1, 2), keepdims=True)
  return x.reshape(n, gh, sh, gw, sw, c).sum(axis=(2, 4))


def cell_mean(x, s: int):
  """Average of x over each s x s cell (edge cells average the pixels they cover)."""
  if s == 1:
    return x
  counts = cell_counts(x.shape[1], x.shape[2], s)
  return cell_sum(x, s) / jnp.asarray(counts, x.dtype)[None, :, :, None]


def upsample(g, s, height: int, width: int):
  """Nearest upsampling: copies each cell of g (N, gh, gw, C) to its s x s (or sh x sw) pixels,
  cropped to (H, W)."""
  sh, sw = _pair(s)
  if (sh, sw) == (1, 1):
    return g[:, :height, :width]
  n, gh, gw, c = g.shape
  g = jnp.broadcast_to(g[:, :, None, :, None, :], (n, gh, sh, gw, sw, c))
  return g.reshape(n, gh * sh, gw * sw, c)[:, :height, :width]


def multiply_by_cells(x, score, s: int):
  """x * Up_s(score) without materialising the upsampled score when H, W are multiples of s."""
  n, h, w, c = x.shape
  if s == 1:
    return x * score
  if h % s == 0 and w % s == 0:
    return _multiply_by_cells(x, score, s)
  return x * upsample(score, s, h, w)


def _multiply_cells_fwd_only(x, score, s):
  n, h, w, c = x.shape
  out = x.reshape(n, h // s, s, w // s, s, c) * score[:, :, None, :, None, :]
  return out.reshape(n, h, w, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _multiply_by_cells(x, score, s):
  return _multiply_cells_fwd_only(x, score, s)


def _multiply_by_cells_fwd(x, score, s):
  return _multiply_cells_fwd_only(x, score, s), (x, score)


def _multiply_by_cells_bwd(s, res, dy):
  # d score = CellSum_s(dy * x), via cell_sum (strided slices for s = 2) rather than the
  # reshape-reduce that autodiff of the broadcast would give.
  x, score = res
  return (_multiply_cells_fwd_only(dy, score, s).astype(x.dtype),
          cell_sum(dy * x, s).astype(score.dtype))


_multiply_by_cells.defvjp(_multiply_by_cells_fwd, _multiply_by_cells_bwd)


def common_base(scales: Sequence[int]) -> int:
  """The base cell size b = gcd(scales): every scale's cells are unions of b x b cells."""
  return math.gcd(*scales) if scales else 1
