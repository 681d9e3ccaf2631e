"""The CPU backend's recalibration with its BatchNorm folded in (backends/cpu/folded.py)
against the plain maths: hand-written gradients against autodiff, the folded BatchNorm against
the BatchNorm. Whole networks: tests/test_implementations.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mssar_jax import ops
from mssar_jax.backends.cpu import folded
from mssar_jax.recalibration import common as recal_common


def _close(actual, expected, rtol=2e-5):
  """Equal up to float32 rounding, relative to the largest magnitude of ``expected``."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape
  scale = max(float(np.abs(expected).max()), 1e-6)
  np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


def _cell_mean_reference(x, cell):
  n, h, w, c = x.shape
  return x.reshape(n, h // cell[0], cell[0], w // cell[1], cell[1], c).mean(axis=(2, 4))


def _up_reference(grid, cell):
  return jnp.repeat(jnp.repeat(grid, cell[0], axis=1), cell[1], axis=2)


@pytest.mark.parametrize("cell", [(2, 2), (4, 4), (8, 8)])
def test_pool_and_stats_gradient_equals_autodiff(cell):
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (3, 8, 8, 5)) * 2.0 + 0.5
  w_means = jax.random.normal(keys[1], (3, 8 // cell[0], 8 // cell[1], 5))
  w_mean, w_var = jax.random.normal(keys[2], (5,)), jax.random.normal(keys[3], (5,))

  def loss(fn, x):
    means, mean, var = fn(x)
    return jnp.sum(means * w_means) + jnp.sum(mean * w_mean) + jnp.sum(var * w_var)

  reference = lambda x: (_cell_mean_reference(x, cell), *ops.batch_stats(x))
  fused = lambda x: folded.pool_and_stats(x, cell)
  for got, want in zip(fused(x), reference(x)):
    _close(got, want)
  _close(jax.grad(lambda x: loss(fused, x))(x), jax.grad(lambda x: loss(reference, x))(x))


@pytest.mark.parametrize("cell", [(2, 2), (4, 4), (8, 8)])
def test_excite_and_gate_gradient_equals_autodiff(cell):
  keys = jax.random.split(jax.random.key(1), 9)
  n, size, c, k = 2, 8, 6, 3
  grid = (n, size // cell[0], size // cell[1])
  args = (jax.random.normal(keys[0], (n, size, size, c)),       # x
          jax.random.normal(keys[1], (c,)),                     # a
          jax.random.normal(keys[2], (c,)),                     # b
          jax.random.normal(keys[3], grid + (k,)),              # h
          jax.random.normal(keys[4], (k, c)),                   # kernel
          jax.random.normal(keys[5], (c,)))                     # bias
  w_out = jax.random.normal(keys[6], (n, size, size, c))
  w_score = jax.random.normal(keys[7], grid + (c,))

  def reference(x, a, b, h, kernel, bias):
    score = jax.nn.sigmoid(jax.nn.relu(h) @ kernel + bias)
    return (x * a + b) * _up_reference(score, cell), score

  def loss(fn, *args):
    out, score = fn(*args)
    return jnp.sum(out * w_out) + jnp.sum(score * w_score)

  fused = lambda *args: folded.excite_and_gate(*args, cell)
  for got, want in zip(fused(*args), reference(*args)):
    _close(got, want)
  argnums = tuple(range(6))
  grads = jax.grad(lambda *a: loss(fused, *a), argnums)(*args)
  expected = jax.grad(lambda *a: loss(reference, *a), argnums)(*args)
  for got, want in zip(grads, expected):
    _close(got, want)


@pytest.mark.parametrize("train", [True, False])
def test_folded_batch_norm_is_the_batch_norm(train):
  x = jax.random.normal(jax.random.key(2), (4, 8, 8, 3)) * 3.0 + 1.0
  bn = nn.BatchNorm(use_running_average=not train, momentum=0.9)
  variables = {"params": {"scale": jnp.array([0.5, 2.0, -1.0]), "bias": jnp.array([0.1, 0.0, 3.0])},
               "batch_stats": {"mean": jnp.array([1.0, 0.9, 1.1]), "var": jnp.array([9.0, 8.0, 10.0])}}
  y, stats = bn.apply(variables, x, mutable=["batch_stats"])
  affine = folded.FoldedBatchNorm(use_running_average=not train, momentum=0.9)
  (means, a, b), stats_affine = affine.apply(variables, x, (2, 2), mutable=["batch_stats"])
  _close(x * a + b, y)
  _close(means * a + b, _cell_mean_reference(y, (2, 2)))
  for name in ("mean", "var"):
    np.testing.assert_array_equal(stats_affine["batch_stats"][name], stats["batch_stats"][name])


def test_dense_params_initialise_like_dense():
  h = jnp.ones((2, 5, 5, 4))
  dense = nn.Dense(7).init(jax.random.key(4), h)
  params = recal_common.DenseParams(7).init(jax.random.key(4), h)
  assert jax.tree.structure(params) == jax.tree.structure(dense)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(dense)):
    np.testing.assert_array_equal(got, want)
