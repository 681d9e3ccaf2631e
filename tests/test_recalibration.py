"""The recalibration family: identities between code paths, symmetry, parameter formulas, errors."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mssar_jax import models, ops
from mssar_jax.errors import ConfigError
from mssar_jax.recalibration import (MultiScaleSAR, SqueezeExcite, get_recalibration,
                                     list_recalibrations, make_recalibration)
from mssar_jax.recalibration import common


def se_parameters(channels, reduction=16, min_channels=4):
  """SE's docstring formula: 2*C*C/r + C/r + C."""
  width = common.reduced_channels(channels, reduction, min_channels)
  return 2 * channels * width + width + channels


def extra_parameters(channels, scales, kernel_size, weighting, grid_cells):
  """MS-SAR's docstring formulas: per scale k*k*(C/r)^2, (C/r)^2 or gh*gw*(C/r)^2."""
  width = common.reduced_channels(channels, 16, 4)
  per_scale = {"asymmetric": [kernel_size ** 2] * len(scales),
               "symmetric": [1] * len(scales), "positional": grid_cells}[weighting]
  return sum(per_scale) * width * width


def _x(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _count(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def _score(module, variables, x):
  _, state = module.apply(variables, x, mutable=["intermediates"])
  return state["intermediates"]["score"][0]


def test_registry():
  assert list_recalibrations() == ["none", "se", "ms_sar"]
  assert get_recalibration("none") is None
  assert get_recalibration("se") is SqueezeExcite
  assert get_recalibration("ms_sar") is MultiScaleSAR
  with pytest.raises(ConfigError, match="unknown recalibration 'sar'.*none, se, ms_sar"):
    get_recalibration("sar")


def test_ms_sar_without_scales_is_se():
  x = _x((3, 8, 8, 32))
  variables = SqueezeExcite().init(jax.random.key(1), x)
  ms = MultiScaleSAR(scales=())
  assert jax.tree.structure(ms.init(jax.random.key(2), x)) == jax.tree.structure(variables)
  np.testing.assert_allclose(ms.apply(variables, x), SqueezeExcite().apply(variables, x),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("weighting", ["asymmetric", "symmetric", "positional"])
def test_zero_context_init_starts_as_se_and_learns_context(weighting):
  x = _x((3, 16, 16, 32))
  ms = MultiScaleSAR(scales=(2, 4, 8), weighting=weighting, context_init="zeros")
  variables = ms.init(jax.random.key(1), x)
  params = variables["params"]
  assert sorted(params) == ["context_2", "context_4", "context_8", "expand", "reduce"]
  assert _count(params) == (se_parameters(32) +
                            extra_parameters(32, (2, 4, 8), 3, weighting, [64, 16, 4]))
  se_params = {"params": {k: params[k] for k in ("reduce", "expand")}}
  np.testing.assert_allclose(ms.apply(variables, x), SqueezeExcite().apply(se_params, x),
                             rtol=1e-6, atol=1e-6)
  # Zero weights still get a gradient: the context is learned from SE's starting point.
  grads = jax.grad(lambda p: jnp.sum(ms.apply({"params": p}, x) * x))(params)
  for s in (2, 4, 8):
    assert float(jnp.max(jnp.abs(grads[f"context_{s}"]["kernel"]))) > 1e-4
  # The default starts with random context: not SE.
  random_init = MultiScaleSAR(scales=(2, 4, 8), weighting=weighting)
  assert not np.allclose(random_init.apply(random_init.init(jax.random.key(1), x), x),
                         SqueezeExcite().apply(se_params, x), atol=1e-3)


@pytest.mark.parametrize("weighting", ["asymmetric", "symmetric", "positional"])
@pytest.mark.parametrize("shape,scales", [
    ((2, 16, 16, 32), (2, 4, 8)),   # divisible: b = 2
    ((2, 7, 7, 32), (2, 4)),        # ImageNet's last stage: edge cells are partial
    ((2, 10, 14, 16), (2, 4)),      # non-square, 10 and 14 not multiples of 4
    ((2, 12, 9, 16), (3, 6)),       # b = 3, width not a multiple of 3 or 6
    ((2, 9, 11, 16), (2, 3)),       # no common multiple: b = gcd = 1
])
def test_pooled_evaluation_equals_direct(shape, scales, weighting):
  x = _x(shape)
  pooled = MultiScaleSAR(scales=scales, weighting=weighting)
  direct = MultiScaleSAR(scales=scales, weighting=weighting, evaluation="direct")
  variables = pooled.init(jax.random.key(1), x)
  # Larger squeeze biases make the local context terms matter for the comparison.
  variables = jax.tree.map(lambda a: a * 3.0, variables)
  y_pooled, y_direct = pooled.apply(variables, x), direct.apply(variables, x)
  assert y_pooled.shape == x.shape
  np.testing.assert_allclose(y_pooled, y_direct, rtol=2e-5, atol=2e-5)
  # The score at full resolution really varies over space (it is not SE in disguise).
  full = ops.upsample(_score(pooled, variables, x), ops.common_base(scales), *shape[1:3])
  assert float(jnp.std(full, axis=(1, 2)).mean()) > 1e-3
  np.testing.assert_allclose(full, _score(direct, variables, x), rtol=2e-5, atol=2e-5)


def test_scores_are_gates_in_unit_interval():
  x = jnp.abs(_x((2, 16, 16, 24))) + 0.1
  for module in (SqueezeExcite(), MultiScaleSAR()):
    variables = module.init(jax.random.key(0), x)
    ratio = module.apply(variables, x) / x
    assert float(ratio.min()) > 0.0 and float(ratio.max()) < 1.0


def _flip(a):
  return a[:, :, ::-1, :]


def test_symmetric_weighting_commutes_with_left_right_flip():
  x = _x((2, 16, 16, 32))
  module = MultiScaleSAR(weighting="symmetric")
  variables = module.init(jax.random.key(3), x)
  np.testing.assert_allclose(_score(module, variables, _flip(x)),
                             _flip(_score(module, variables, x)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(module.apply(variables, _flip(x)),
                             _flip(module.apply(variables, x)), rtol=1e-5, atol=1e-6)


def test_asymmetric_weighting_does_not_commute_with_flip():
  x = _x((2, 16, 16, 32))
  module = MultiScaleSAR()
  variables = module.init(jax.random.key(3), x)
  gap = jnp.abs(_score(module, variables, _flip(x)) - _flip(_score(module, variables, x)))
  assert float(gap.max()) > 1e-3


@pytest.mark.parametrize("channels", [12, 16, 64, 256])
@pytest.mark.parametrize("weighting,scales,kernel_size", [
    ("asymmetric", (2, 4, 8), 3), ("asymmetric", (4,), 5), ("symmetric", (2, 4, 8), 3),
    ("positional", (2, 4, 8), 3), ("asymmetric", (1, 2), 3)])
def test_parameter_counts_match_docstring_formulas(channels, weighting, scales, kernel_size):
  x = jnp.zeros((1, 16, 16, channels))
  se = _count(jax.eval_shape(SqueezeExcite().init, jax.random.key(0), x))
  assert se == se_parameters(channels)
  module = MultiScaleSAR(scales=scales, kernel_size=kernel_size, weighting=weighting)
  counted = _count(jax.eval_shape(module.init, jax.random.key(0), x))
  cells = [ops.grid_size(16, s) ** 2 for s in scales]
  assert counted - se == extra_parameters(channels, scales=scales, kernel_size=kernel_size,
                                          weighting=weighting, grid_cells=cells)


def test_reduced_channels_have_a_floor():
  assert common.reduced_channels(12, 16, 4) == 4
  assert common.reduced_channels(256, 16, 4) == 16
  params = SqueezeExcite().init(jax.random.key(0), jnp.zeros((1, 4, 4, 12)))["params"]
  assert params["reduce"]["kernel"].shape == (12, 4)


def test_cell_mean_averages_what_edge_cells_cover():
  x = jnp.arange(7.0).reshape(1, 7, 1, 1) * jnp.ones((1, 7, 7, 1))
  pooled = ops.cell_mean(x, 4)
  assert pooled.shape == (1, 2, 2, 1)
  np.testing.assert_allclose(pooled[0, :, 0, 0], [1.5, 5.0])  # mean(0..3), mean(4..6)


def test_bf16_compute_keeps_float32_params():
  x = _x((2, 16, 16, 32)).astype(jnp.bfloat16)
  for module in (SqueezeExcite(dtype=jnp.bfloat16), MultiScaleSAR(dtype=jnp.bfloat16)):
    variables = module.init(jax.random.key(0), x)
    assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    y = module.apply(variables, x)
    assert y.dtype == jnp.bfloat16 and bool(jnp.isfinite(y.astype(jnp.float32)).all())


@pytest.mark.parametrize("kwargs,match", [
    (dict(reduction=0), "reduction must be a positive number"),
    (dict(reduction=-4), "reduction must be a positive number"),
    (dict(scales=(0, 2)), "every scale must be a positive integer"),
    (dict(scales=(2.5,)), "every scale must be a positive integer"),
    (dict(scales=(2, 2)), "scales must be distinct"),
    (dict(kernel_size=2), "kernel_size must be a positive odd integer"),
    (dict(weighting="diagonal"), "unknown weighting 'diagonal'"),
    (dict(evaluation="fast"), "unknown evaluation 'fast'"),
    (dict(context_init="ones"), "unknown context_init 'ones'.*lecun_normal, zeros"),
    (dict(width=3), "unknown argument width"),
])
def test_bad_arguments_fail_at_construction(kwargs, match):
  with pytest.raises(ConfigError, match=match):
    make_recalibration("ms_sar", **kwargs)


def test_shape_errors_are_one_line_and_raised_while_tracing():
  with pytest.raises(ConfigError, match=r"scale 8 is larger than the 7x7 feature map.*scales=\(2, 4\)") as e:
    jax.eval_shape(MultiScaleSAR().init, jax.random.key(0), jnp.zeros((1, 7, 7, 64)))
  assert "\n" not in str(e.value)
  with pytest.raises(ConfigError, match="input has 0 channels"):
    jax.eval_shape(SqueezeExcite().init, jax.random.key(0), jnp.zeros((1, 8, 8, 0)))
  with pytest.raises(ConfigError, match="expects NHWC input"):
    jax.eval_shape(MultiScaleSAR().init, jax.random.key(0), jnp.zeros((8, 8, 16)))


def test_positional_weighting_needs_its_input_size():
  module = MultiScaleSAR(weighting="positional", scales=(2, 4))
  variables = module.init(jax.random.key(0), jnp.zeros((1, 16, 16, 32)))
  with pytest.raises(ConfigError, match="initialised for a 8x8 grid at scale 2 but got 4x4"):
    module.apply(variables, jnp.zeros((1, 8, 8, 32)))


def test_init_scores_tool_sees_se_at_zero_context_init():
  spec = importlib.util.spec_from_file_location(
      "init_scores", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "init_scores.py"))
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  images = np.asarray(_x((4, 32, 32, 3)))
  spread = {init: tool.score_spread(
      models.get_model("cifar_resnet20", depth=8, num_classes=10, recalibration="ms_sar",
                       context_init=init), images, 0) for init in ("lecun_normal", "zeros")}
  assert spread["zeros"][0] == spread["lecun_normal"][0] == 3  # one module per block
  assert spread["zeros"][1] < 1e-6  # SE: one score per channel, the same at every position
  assert spread["lecun_normal"][1] > 1e-3
  assert spread["zeros"][2] > 1e-3
