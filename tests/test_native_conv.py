"""oneDNN convolutions through XLA's FFI (mssar_jax.native.onednn_conv) against XLA's own."""

import os
import subprocess
import sys

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from mssar_jax import backends
from mssar_jax.backends.cpu import onednn_conv
from mssar_jax.backends.cpu.batch_norm import BatchNorm
from mssar_jax.models import Implementation, get_model

_NHWC = jax.lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


@pytest.fixture(scope="module", autouse=True)
def require_onednn():
  if not onednn_conv.LIBRARY.available():
    reason = onednn_conv.LIBRARY.unavailable_reason
    if os.environ.get("CI"):
      pytest.fail(f"oneDNN convolutions unavailable in CI: {reason}")
    pytest.skip(f"oneDNN convolutions unavailable: {reason}")


def _conv_and_grads(conv_fn, x, w, strides, padding, dy):
  def f(x, w):
    return conv_fn(x, w, strides, padding, dimension_numbers=_NHWC)
  y, vjp = jax.vjp(f, x, w)
  return (y, *vjp(dy))


# (batch, height, width, in, out, kernel, stride, padding): the zoo's convolutions (3x3 s1/s2,
# the 3-channel stems, 1x1 projections, ImageNet's 7x7/2 stem), MS-SAR's 4-channel context
# convolution and odd, asymmetric cases. The first three (5e7 flops or more) are split by
# batch over XLA's threads when it has several (an odd batch in the third); the others run as
# one chunk.
CASES = [
    (32, 32, 32, 16, 16, 3, 1, ((1, 1), (1, 1))),
    (64, 16, 16, 32, 32, 3, 1, ((1, 1), (1, 1))),
    (33, 32, 32, 16, 32, 3, 2, ((1, 1), (1, 1))),
    (16, 16, 16, 4, 4, 3, 1, ((1, 1), (1, 1))),
    (4, 32, 32, 16, 16, 3, 1, ((1, 1), (1, 1))),
    (4, 32, 32, 16, 32, 3, 2, ((1, 1), (1, 1))),
    (4, 32, 32, 3, 16, 3, 1, ((1, 1), (1, 1))),
    (4, 16, 16, 32, 64, 1, 2, ((0, 0), (0, 0))),
    (2, 64, 64, 3, 8, 7, 2, ((3, 3), (3, 3))),
    (3, 9, 11, 5, 7, 3, 2, ((0, 2), (1, 0))),
    (2, 8, 8, 24, 12, 1, 1, ((0, 0), (0, 0))),
]


@pytest.mark.parametrize("n,h,w_,c,o,k,s,padding", CASES)
def test_forward_and_gradients_equal_xla(n, h, w_, c, o, k, s, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((n, h, w_, c)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, c, o)), jnp.float32)
  y_ref = jax.lax.conv_general_dilated(x, w, (s, s), padding, dimension_numbers=_NHWC)
  dy = jnp.asarray(rng.standard_normal(y_ref.shape), jnp.float32)
  ref = jax.jit(lambda x, w, dy: _conv_and_grads(jax.lax.conv_general_dilated, x, w, (s, s),
                                                  padding, dy))(x, w, dy)
  lowered = jax.jit(lambda x, w, dy: _conv_and_grads(onednn_conv.conv_general_dilated, x, w,
                                                      (s, s), padding, dy)).lower(x, w, dy)
  assert lowered.as_text().count("mssar_onednn_conv_") == 3  # forward, input and weight grads
  new = jax.block_until_ready(lowered.compile()(x, w, dy))
  for name, a, b in zip(("y", "dx", "dw"), ref, new):
    assert a.shape == b.shape, name
    scale = float(jnp.max(jnp.abs(a)))
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=2e-5 * scale,
                               err_msg=name)


def test_other_convolutions_fall_back_to_xla():
  x = jnp.ones((2, 8, 8, 4), jnp.float32)
  w = jnp.ones((3, 3, 4, 4), jnp.float32)
  for args, kwargs in [
      ((x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), (1, 1), ((1, 1), (1, 1))), {}),
      ((x, w, (1, 1), "SAME"), {}),
      ((x, w, (1, 1), ((1, 1), (1, 1))), {"rhs_dilation": (2, 2)}),
      ((x, jnp.ones((3, 3, 1, 4)), (1, 1), ((1, 1), (1, 1))), {"feature_group_count": 4}),
  ]:
    lhs, rhs, strides, padding = args
    text = jax.jit(lambda lhs, rhs: onednn_conv.conv_general_dilated(
        lhs, rhs, strides, padding, dimension_numbers=_NHWC, **kwargs)).lower(lhs, rhs).as_text()
    assert "mssar_onednn_conv" not in text and "convolution" in text


# The same BatchNorm on both sides, so that only the convolutions differ.
XLA_CONV = Implementation(norm=BatchNorm)
ONEDNN = Implementation(norm=BatchNorm, conv=functools.partial(
    nn.Conv, conv_general_dilated=onednn_conv.conv_general_dilated))


def _train_grads(model, variables, images, labels):
  """(HLO text, (loss, grads)) of the train-mode loss."""
  def loss(params):
    logits, _ = model.apply({**variables, "params": params}, images, train=True,
                            mutable=["batch_stats"])
    return -jnp.mean(jnp.take_along_axis(nn.log_softmax(logits), labels[:, None], 1))
  lowered = jax.jit(jax.value_and_grad(loss)).lower(variables["params"])
  return lowered.as_text(), lowered.compile()(variables["params"])


@pytest.mark.parametrize("name,recalibration,kwargs", [
    ("cifar_resnet20", "ms_sar", {"depth": 8}),
    ("cifar_resnet20", "none", {"depth": 14, "scan_blocks": True}),
    ("cifar_densenet40", "se", {"depth": 10})])
def test_model_gradients_equal_with_either_convolution(name, recalibration, kwargs):
  if jax.__version_info__ < (0, 11) and kwargs.get("scan_blocks"):
    pytest.xfail("jax 0.10: 1e-3 off inside scanned blocks; the CPU backend does not use "
                 "the kernels with jax < 0.11 (test_oneDNN_kernels_need_jax_0_11)")
  model = get_model(name, num_classes=10, recalibration=recalibration, impl=XLA_CONV,
                    **kwargs)
  with_onednn = get_model(name, num_classes=10, recalibration=recalibration, impl=ONEDNN,
                          **kwargs)
  # Images at which all three nets are smooth: with default_rng(1) the scanned ResNet-14 sits
  # at a ReLU kink, where a 3e-7 relative change of the images moves gradients by 2%.
  rng = np.random.default_rng(2)
  images = jnp.asarray(rng.standard_normal((8, 32, 32, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 8))
  variables = model.init(jax.random.key(0), images, train=False)
  hlo_xla, (loss_xla, g_xla) = _train_grads(model, variables, images, labels)
  hlo_dnn, (loss_dnn, g_dnn) = _train_grads(with_onednn, variables, images, labels)
  assert "mssar_onednn_conv" not in hlo_xla
  assert "mssar_onednn_conv" in hlo_dnn
  np.testing.assert_allclose(float(loss_dnn), float(loss_xla), rtol=1e-5)
  assert jax.tree.structure(g_dnn) == jax.tree.structure(g_xla)
  # Per leaf: 1e-4 of its largest value, plus 2e-5 of the largest gradient of all (a leaf
  # whose gradient is nearly zero, such as an SE bias here, carries the rounding noise of the
  # gradients around it). Rounding-level changes of the images (3e-7) stay below 1% of this.
  largest = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(g_xla))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_xla), jax.tree.leaves(g_dnn)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0,
                               atol=1e-4 * float(jnp.max(jnp.abs(a))) + 2e-5 * largest,
                               err_msg=jax.tree_util.keystr(path))


def test_oneDNN_kernels_need_jax_0_11():
  # With jax 0.10 (Python 3.11) the kernels' gradients inside nn.scan'd blocks were 1e-3 off
  # XLA's: the CPU implementation leaves them out there.
  impl = backends.choose("cpu", device_count=1).impl
  assert (impl.conv is not nn.Conv) == (jax.__version_info__ >= (0, 11))


def test_cpu_implementation_keeps_xla_convolutions_with_several_devices():
  # The tests simulate 8 CPU devices (conftest): the custom call has no sharding
  # rule, so the CPU implementation keeps XLA's convolutions there.
  assert jax.device_count() > 1
  assert backends.choose("cpu").impl.conv is nn.Conv
  if jax.__version_info__ >= (0, 11):
    assert backends.choose("cpu", device_count=1).impl.conv.keywords == {
        "conv_general_dilated": onednn_conv.conv_general_dilated}


def test_direct_call_in_a_fresh_process_registers_the_kernels():
  # conv_nhwc used before anything asked LIBRARY.available() must still find its FFI targets.
  code = ("import jax.numpy as jnp; from mssar_jax.backends.cpu import onednn_conv as c; "
          "y = c.conv_nhwc(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 3)), (1, 1), "
          "((1, 1), (1, 1))); print(float(y[0, 1, 1, 0]), float(y[0, 0, 0, 0]))")
  env = {**os.environ, "XLA_FLAGS": ""}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env=env)
  assert out.stdout.split() == ["18.0", "8.0"]  # 3x3x2 ones inside, 2x2x2 at a corner


def test_forced_onednn_is_correct_on_a_sharded_batch():
  # No sharding rule: XLA gathers the operands, so the results must still be exact.
  mesh = Mesh(np.array(jax.devices()), ("data",))
  rng = np.random.default_rng(2)
  x = jax.device_put(jnp.asarray(rng.standard_normal((16, 8, 8, 4)), jnp.float32),
                     NamedSharding(mesh, P("data")))
  w = jax.device_put(jnp.asarray(rng.standard_normal((3, 3, 4, 5)), jnp.float32),
                     NamedSharding(mesh, P()))

  def grads(conv_fn):
    def loss(x, w):
      y = conv_fn(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC)
      return jnp.sum(jnp.sin(y))
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
  for a, b in zip(grads(jax.lax.conv_general_dilated), grads(onednn_conv.conv_general_dilated)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0,
                               atol=1e-5 * float(jnp.max(jnp.abs(a))))
