"""BatchNorm with the same variables and function as ``flax.linen.BatchNorm``, and a
hand-written gradient that makes two passes over the activations instead of three.

Over the last (channel) axis, with M the number of elements per channel in the batch:

    mean = sum(x) / M,   var = max(sum(x^2) / M - mean^2, 0),   r = 1 / sqrt(var + eps)
    y = (x - mean) * a + bias,   a = scale * r

Autodiff of that keeps ``x - mean`` as an extra activation-sized array, written in the
forward pass, a costly extra pass on XLA:CPU (docs/performance.md). The custom VJP keeps ``x`` instead and, for the cotangent g of y (and gm, gv
of the returned mean and var), computes

    dbias = sum(g),   dscale = r * sum(g * (x - mean))
    dx = a * g + (x - mean) * (2 gv / M - a * r * dscale / M) + (gm - a * dbias) / M

i.e. one reduction pass and one elementwise pass (the code forms sum(g * (x - mean)) as
sum(g * x) - mean * sum(g), so no centred array is formed in the backward pass either). Statistics are float32 whatever ``dtype``;
the running averages are updated as flax does (not during init).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mssar_jax import ops


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x, scale, bias, epsilon: float, dtype):
  """(y, mean, var) of training-mode BatchNorm over all axes but the last; y in ``dtype``."""
  return _forward(x, scale, bias, epsilon, dtype)[0]


def _forward(x, scale, bias, epsilon, dtype):
  mean, var = ops.batch_stats(x)
  r = jax.lax.rsqrt(var + epsilon)
  a = scale.astype(jnp.float32) * r
  y = ((x.astype(jnp.float32) - mean) * a + bias.astype(jnp.float32)).astype(dtype)
  return (y, mean, var), (x, mean, r, scale, bias)


def _backward(epsilon, dtype, residuals, cotangents):
  del epsilon, dtype  # r already holds epsilon
  x, mean, r, scale, bias = residuals
  g, g_mean, g_var = cotangents
  axes = tuple(range(x.ndim - 1))
  m = x.size // x.shape[-1]
  xf, gf = x.astype(jnp.float32), g.astype(jnp.float32)
  d_bias = jnp.sum(gf, axes)
  d_scale = r * (jnp.sum(gf * xf, axes) - mean * d_bias)
  a = scale.astype(jnp.float32) * r
  c1 = (2.0 * g_var - a * r * d_scale) / m
  c0 = (g_mean - a * d_bias) / m - mean * c1
  dx = (gf * a + xf * c1 + c0).astype(x.dtype)
  return dx, d_scale.astype(scale.dtype), d_bias.astype(bias.dtype)


batch_norm_train.defvjp(_forward, _backward)


def batch_norm_variables(module: nn.Module, features: int):
  """nn.BatchNorm's variables in ``module``: (running mean, running var, scale, bias)."""
  ra_mean = module.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
  ra_var = module.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
  scale = module.param("scale", module.scale_init, (features,), module.param_dtype)
  bias = module.param("bias", module.bias_init, (features,), module.param_dtype)
  return ra_mean, ra_var, scale, bias


def update_running_averages(module: nn.Module, ra_mean, ra_var, mean, var) -> None:
  """flax's update of the running statistics (not during init)."""
  if not module.is_initializing():
    ra_mean.value = module.momentum * ra_mean.value + (1 - module.momentum) * mean
    ra_var.value = module.momentum * ra_var.value + (1 - module.momentum) * var


class BatchNorm(nn.Module):
  """``nn.BatchNorm`` over the last axis (same 'scale'/'bias' params, 'mean'/'var' batch
  stats, defaults, running-average update and outputs) with ``batch_norm_train``'s gradient.

  No ``axis_name``: under ``jax.jit`` with a batch sharded over a mesh the statistics are
  those of the global batch.
  """
  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    ra_mean, ra_var, scale, bias = batch_norm_variables(self, x.shape[-1])
    dtype = self.dtype or jnp.result_type(x, scale)
    if self.use_running_average:
      mul = jax.lax.rsqrt(ra_var.value + self.epsilon) * scale
      return ((x.astype(jnp.float32) - ra_mean.value) * mul + bias).astype(dtype)
    y, mean, var = batch_norm_train(x, scale, bias, float(self.epsilon), jnp.dtype(dtype))
    update_running_averages(self, ra_mean, ra_var, mean, var)
    return y
