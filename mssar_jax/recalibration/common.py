"""What SE and MS-SAR share: the squeeze / excitation parameters and maths, argument checks."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mssar_jax.errors import ConfigError


class DenseParams(nn.Module):
  """The parameters of ``nn.Dense(features)`` ('kernel' (K, features), 'bias'), same names,
  shapes and initialisers, returned instead of applied, so that another implementation of
  the same function (``backends.cpu.folded``) can fold a BatchNorm into them."""
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
  """``scales`` as a tuple of distinct positive ints, or ConfigError."""
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
