"""The hand-written gate kernels (backends/cpu/gate_kernels.cc) against folded.py's jnp code:
each kernel, the gate's gradients, and whole networks, with the kernels on and off."""

import os

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from mssar_jax import backends
from mssar_jax.backends import cpu
from mssar_jax.backends.cpu import folded, gate_kernels
from mssar_jax.errors import ConfigError
from mssar_jax.models import get_model


@pytest.fixture(scope="module", autouse=True)
def require_kernels():
  if not gate_kernels.LIBRARY.available():
    reason = gate_kernels.LIBRARY.unavailable_reason
    if os.environ.get("CI"):
      pytest.fail(f"gate kernels unavailable in CI: {reason}")
    pytest.skip(f"gate kernels unavailable: {reason}")


def _close(actual, expected, rtol):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape
  scale = max(float(np.abs(expected).max()), 1e-6)
  np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


# (N, H, W, C): one chunk, and several (>= 2^15 elements: split over XLA's threads).
SHAPES = [(3, 4, 6, 16), (2, 8, 8, 48), (8, 16, 16, 32), (16, 32, 32, 16)]


@pytest.mark.parametrize("shape", SHAPES)
def test_pool_stats_equals_jnp(shape):
  x = jax.random.normal(jax.random.key(0), shape) * 3.0 + 1.5
  want = jax.jit(lambda x: folded._pool_and_stats_fwd(x, (2, 2), False)[0])(x)
  got = jax.jit(gate_kernels.pool_stats)(x)
  for g, w in zip(got, want):
    _close(g, w, 1e-6)


@pytest.mark.parametrize("c", [16, 64, 256])
def test_excite_equals_sigmoid(c):
  keys = jax.random.split(jax.random.key(1), 3)
  h = jax.random.normal(keys[0], (5, 7, 4)) * 30.0  # pre-activations far into both tails
  kernel = jax.random.normal(keys[1], (4, c))
  bias = jax.random.normal(keys[2], (c,))
  want = jax.nn.sigmoid(jnp.dot(jax.nn.relu(h), kernel) + bias)
  got = jax.jit(gate_kernels.excite)(h, kernel, bias)
  assert bool(jnp.all(jnp.isfinite(got)))
  # rtol 4e-6: pre-activations of ~100 summed in another order differ by a few ulps.
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=4e-6, atol=3e-7)
  assert float(jnp.min(got)) >= 0.0 and float(jnp.max(got)) <= 1.0


@pytest.mark.parametrize("shape", SHAPES)
def test_gate_gradients_equal_jnp(shape):
  n, height, width, c = shape
  keys = jax.random.split(jax.random.key(2), 8)
  x = jax.random.normal(keys[0], shape) * 2.0 + 0.3
  a, b = jax.random.normal(keys[1], (c,)), jax.random.normal(keys[2], (c,))
  h = jax.random.normal(keys[3], (n, height // 2, width // 2, 4)) * 2.0
  kernel, bias = jax.random.normal(keys[4], (4, c)), jax.random.normal(keys[5], (c,))
  g_out = jax.random.normal(keys[6], shape)
  g_score = jax.random.normal(keys[7], (n, height // 2, width // 2, c))

  args = (x, a, b, h, kernel, bias)

  def run(kernels):
    def loss(*args):
      out, score = folded.excite_and_gate(*args, (2, 2), kernels)
      return jnp.sum(out * g_out) + jnp.sum(score * g_score)
    grads = jax.jit(jax.value_and_grad(loss, argnums=range(6)))
    return grads.lower(*args).as_text(), grads(*args)

  text_on, on = run(True)
  text_off, off = run(False)
  assert "mssar_gate_GateBackward" in text_on and "mssar_gate_Excite" in text_on
  assert "mssar_gate" not in text_off
  _close(on[0], off[0], 1e-6)
  for got, want in zip(on[1], off[1]):
    _close(got, want, 2e-5)


@pytest.mark.parametrize("name,recalibration,kwargs", [
    ("cifar_resnet20", "ms_sar", {"depth": 8}),
    ("cifar_resnet20", "ms_sar", {"depth": 8, "scales": (2,)}),
])
def test_network_gradients_equal_with_kernels_on_and_off(name, recalibration, kwargs):
  rng = np.random.default_rng(3)
  images = jnp.asarray(rng.standard_normal((8, 32, 32, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 8))

  def run(kernels):
    impl = cpu.implementation(onednn=False, kernels=kernels)
    model = get_model(name, num_classes=10, recalibration=recalibration, impl=impl, **kwargs)
    variables = model.init(jax.random.key(0), images, train=False)

    def loss(params):
      logits, state = model.apply({**variables, "params": params}, images, train=True,
                                  mutable=["batch_stats"])
      onehot = jax.nn.one_hot(labels, 10)
      return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * onehot, -1)), state

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    return step.lower(variables["params"]).as_text(), step(variables["params"])

  text_on, on = run(True)
  text_off, off = run(False)
  assert text_on.count("mssar_gate_PoolStats") == 3  # one per stage (16, 32, 64 channels)
  assert "mssar_gate" not in text_off
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(off), jax.tree.leaves(on)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0,
                               atol=1e-4 * float(jnp.max(jnp.abs(want))) + 1e-7,
                               err_msg=jax.tree_util.keystr(path))


def test_kernels_only_where_they_apply():
  x16 = jnp.zeros((2, 8, 8, 16))
  assert gate_kernels.fits(x16, (2, 2))
  assert not gate_kernels.fits(x16, (4, 4))                       # other cells
  assert not gate_kernels.fits(jnp.zeros((2, 8, 8, 12)), (2, 2))  # not 16k channels
  assert not gate_kernels.fits(x16.astype(jnp.bfloat16), (2, 2))
  assert not gate_kernels.fits(jnp.zeros((2, 7, 8, 16)), (2, 2))  # odd map
  # The tests simulate 8 devices: the CPU implementation leaves the native kernels out.
  assert jax.device_count() > 1
  assert "gate kernels" not in backends.choose("cpu").impl.name
  assert "gate kernels" in backends.choose("cpu", device_count=1).impl.name
  assert backends.choose("auto", platform="tpu").impl == backends.choose("xla").impl
  with pytest.raises(ConfigError, match="auto, xla, cpu"):
    backends.choose("fast")


@pytest.mark.parametrize("shape", [(3, 4, 6, 16), (16, 16, 16, 32), (4, 1, 1, 64)])
def test_squeeze_and_its_gradients_equal_jnp(shape):
  c = shape[-1]
  keys = jax.random.split(jax.random.key(4), 6)
  means = jax.random.normal(keys[0], shape) + 0.5
  a, b = jax.random.normal(keys[1], (c,)), jax.random.normal(keys[2], (c,))
  kernel, bias = jax.random.normal(keys[3], (c, 4)), jax.random.normal(keys[4], (4,))
  g_z = jax.random.normal(keys[5], shape[:-1] + (4,))
  def run(kernels):
    loss = lambda *args: jnp.sum(folded.squeeze(*args, jnp.float32, kernels) * g_z)
    grads = jax.jit(jax.value_and_grad(loss, argnums=range(5)))
    return grads.lower(means, a, b, kernel, bias).as_text(), grads(means, a, b, kernel, bias)

  text_on, on = run(True)
  text_off, off = run(False)
  assert "mssar_gate_SqueezeBackward" in text_on and "mssar_gate" not in text_off
  _close(on[0], off[0], 1e-6)
  for got, want in zip(on[1], off[1]):
    _close(got, want, 2e-5)


def test_forced_kernels_are_correct_on_a_sharded_batch():
  # No sharding rule: XLA gathers the operands onto one device, so the results must be equal.
  mesh = Mesh(np.array(jax.devices()), ("data",))
  keys = jax.random.split(jax.random.key(6), 6)
  shard = lambda v, spec: jax.device_put(v, NamedSharding(mesh, spec))
  x = shard(jax.random.normal(keys[0], (16, 8, 8, 16)), P("data"))
  h = shard(jax.random.normal(keys[1], (16, 4, 4, 4)), P("data"))
  a, b, bias = (shard(jax.random.normal(k, (16,)), P()) for k in keys[2:5])
  kernel = shard(jax.random.normal(keys[5], (4, 16)), P())

  def run(kernels):
    def loss(x, a, b, h, kernel, bias):
      means, mean, var = folded.pool_and_stats(x, (2, 2), kernels)
      out, score = folded.excite_and_gate(x, a, b, h, kernel, bias, (2, 2), kernels)
      return jnp.sum(jnp.sin(out)) + jnp.sum(means ** 2) + jnp.sum(mean * var) + jnp.sum(score)
    grads = jax.jit(jax.grad(loss, argnums=range(6)))
    return grads.lower(x, a, b, h, kernel, bias).as_text(), grads(x, a, b, h, kernel, bias)

  text_on, on = run(True)
  _, off = run(False)
  assert "mssar_gate_GateBackward" in text_on and "mssar_gate_PoolStats" in text_on
  for got, want in zip(on, off):
    _close(got, want, 2e-5)
