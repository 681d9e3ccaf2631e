"""Cell operations and batch statistics: the leaf every other module builds on.

A cell grid splits an (H, W) map into ceil(H/sh) x ceil(W/sw) non-overlapping sh x sw cells
(``cell`` is an int s for s x s, or a pair). Edge cells of a map whose size is not a multiple
of the cell are smaller; their average is taken over the pixels they cover.

These are the plain forms, good on every backend: sums by ``lax.reduce_window`` (a window
reduction TPUs and GPUs lower natively, no relayout of the map) and nearest upsampling by
``jnp.repeat``. The CPU backend keeps faster forms of its own for 2x2 cells
(``backends.cpu.folded``).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def pair(cell) -> tuple[int, int]:
  return (int(cell), int(cell)) if isinstance(cell, (int, np.integer)) else tuple(cell)


def grid_size(size: int, s: int) -> int:
  return -(-size // s)


def common_base(scales: Sequence[int]) -> int:
  """b = gcd(scales): every scale's cells are unions of b x b cells."""
  return math.gcd(*scales) if scales else 1


def cell_counts(height: int, width: int, cell) -> np.ndarray:
  """Pixels covered by each cell, shape (ceil(H/sh), ceil(W/sw)), float32."""
  def along(size, s):
    n = grid_size(size, s)
    counts = np.full((n,), s, dtype=np.float32)
    counts[-1] = size - s * (n - 1)
    return counts
  sh, sw = pair(cell)
  return np.outer(along(height, sh), along(width, sw)).astype(np.float32)


def cell_sum(x, cell):
  """Sum of x (N, H, W, C) over each cell: (N, ceil(H/sh), ceil(W/sw), C)."""
  sh, sw = pair(cell)
  if (sh, sw) == (1, 1):
    return x
  h, w = x.shape[1], x.shape[2]
  padding = ((0, 0), (0, grid_size(h, sh) * sh - h), (0, grid_size(w, sw) * sw - w), (0, 0))
  return jax.lax.reduce_window(x, np.array(0, x.dtype), jax.lax.add, (1, sh, sw, 1),
                               (1, sh, sw, 1), padding)


def cell_mean(x, cell):
  """Average of x over each cell (edge cells average the pixels they cover)."""
  if pair(cell) == (1, 1):
    return x
  counts = cell_counts(x.shape[1], x.shape[2], cell)
  return cell_sum(x, cell) / jnp.asarray(counts, x.dtype)[None, :, :, None]


def upsample(grid, cell, height: int, width: int):
  """Nearest upsampling: each cell of grid (N, gh, gw, C) copied to its pixels, cropped to
  (H, W)."""
  sh, sw = pair(cell)
  grid = jnp.repeat(jnp.repeat(grid, sh, axis=1), sw, axis=2) if (sh, sw) != (1, 1) else grid
  return grid[:, :height, :width]


def batch_stats(x):
  """Per-channel mean and biased variance over all axes but the last, in float32 (flax's
  BatchNorm formula: E[x^2] - E[x]^2, clipped at 0)."""
  axes = tuple(range(x.ndim - 1))
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axes)
  var = jnp.maximum(jnp.mean(jnp.square(xf), axes) - jnp.square(mean), 0.0)
  return mean, var
