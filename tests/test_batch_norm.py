"""backends.cpu.batch_norm.BatchNorm against flax.linen.BatchNorm: same variables, outputs,
running statistics and gradients (its VJP is hand-written)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mssar_jax.backends.cpu.batch_norm import BatchNorm, batch_norm_train


def _setup(dtype, shape=(8, 6, 6, 16), offset=1.0):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape) * 3 + offset, jnp.float32).astype(dtype)
  params = {"scale": jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32)}
  weights = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return x, params, weights


def _train_outputs(cls, dtype, x, params, weights):
  module = cls(use_running_average=False, momentum=0.9, epsilon=1e-5, dtype=dtype)
  variables = module.init(jax.random.key(0), x)

  def loss(params, x):
    y, updates = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
    return jnp.sum(jnp.sin(y.astype(jnp.float32)) * weights), (y, updates)
  (value, (y, updates)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1),
                                                            has_aux=True))(params, x)
  return variables, value, y, updates, grads


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_train_mode_equals_flax(dtype):
  x, params, weights = _setup(dtype)
  v_ref, l_ref, y_ref, u_ref, g_ref = _train_outputs(nn.BatchNorm, dtype, x, params, weights)
  v_new, l_new, y_new, u_new, g_new = _train_outputs(BatchNorm, dtype, x, params, weights)
  assert jax.tree.map(jnp.shape, v_new) == jax.tree.map(jnp.shape, v_ref)
  assert y_new.dtype == y_ref.dtype == dtype
  np.testing.assert_array_equal(np.asarray(y_new, np.float32), np.asarray(y_ref, np.float32))
  for a, b in zip(jax.tree.leaves(u_ref), jax.tree.leaves(u_new)):
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
  np.testing.assert_allclose(float(l_new), float(l_ref), rtol=1e-6)
  # float32: equal up to summation order; bfloat16 (dx is bfloat16): up to its rounding.
  tolerance = 2e-6 if dtype == jnp.float32 else 2.0 ** -7
  for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_new)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(b, a, rtol=0, atol=tolerance * np.abs(a).max())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_eval_mode_equals_flax(dtype):
  x, params, weights = _setup(dtype)
  _, _, _, updates, _ = _train_outputs(nn.BatchNorm, dtype, x, params, weights)
  variables = {"params": params, **updates}
  y_ref = nn.BatchNorm(use_running_average=True, dtype=dtype).apply(variables, x)
  y_new = BatchNorm(use_running_average=True, dtype=dtype).apply(variables, x)
  assert y_new.dtype == y_ref.dtype
  np.testing.assert_array_equal(np.asarray(y_new, np.float32), np.asarray(y_ref, np.float32))


def test_gradient_through_the_batch_statistics_equals_autodiff():
  # The returned mean and var also get cotangents here (they do not in training, where they
  # only feed the running averages): check the whole VJP against autodiff of the same maths.
  x, params, weights = _setup(jnp.float32, shape=(4, 5, 3, 8), offset=-2.0)

  def reference(x, scale, bias):
    mean = jnp.mean(x, (0, 1, 2))
    var = jnp.maximum(jnp.mean(x * x, (0, 1, 2)) - mean * mean, 0.0)
    y = (x - mean) * (jax.lax.rsqrt(var + 1e-5) * scale) + bias
    return y, mean, var

  def loss(fn, x, scale, bias):
    y, mean, var = fn(x, scale, bias)
    return jnp.sum(jnp.tanh(y) * weights) + jnp.sum(jnp.cos(mean) * 3.0) + jnp.sum(var ** 2)

  ours = lambda x, s, b: batch_norm_train(x, s, b, 1e-5, jnp.dtype(jnp.float32))
  g_ref = jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2))(x, *params.values())
  g_new = jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2))(x, *params.values())
  for a, b in zip(g_ref, g_new):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0,
                               atol=1e-5 * float(jnp.max(jnp.abs(a))))


def test_init_does_not_update_running_statistics():
  x, _, _ = _setup(jnp.float32)
  variables = BatchNorm(use_running_average=False).init(jax.random.key(0), x)
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], 0.0)
  np.testing.assert_array_equal(variables["batch_stats"]["var"], 1.0)
