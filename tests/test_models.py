"""The model zoo: published parameter counts, forward/backward of every model, placement, errors."""

import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mssar_jax.errors import ConfigError
from mssar_jax.models import get_model, input_size, list_models

ALL_MODELS = ["cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56",
              "cifar_resnet110", "cifar_preact_resnet164", "cifar_densenet40",
              "cifar_densenet_bc100", "resnet50", "resnet101", "densenet121"]


def _count(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def _abstract_variables(model, size, batch=1):
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((batch, size, size, 3)))


def _params(name, recalibration="none", **kwargs):
  classes = 1000 if input_size(name) == 224 else 10
  model = get_model(name, num_classes=classes, recalibration=recalibration, **kwargs)
  return _count(_abstract_variables(model, input_size(name))["params"])


def test_list_models():
  assert list_models() == ALL_MODELS


@pytest.mark.parametrize("name,published,tolerance", [
    ("cifar_resnet20", 269_722, 0),                # He et al. 2016 (0.27M), exact count
    ("cifar_resnet110", 1.7e6, 0.03),              # He et al. 2016, Table 6: 1.7M
    ("cifar_preact_resnet164", 1.7e6, 0.03),       # He et al. 2016b: 1.7M
    ("cifar_densenet40", 1.0e6, 0.03),             # Huang et al. 2017, Table 2: 1.0M
    ("cifar_densenet_bc100", 0.8e6, 0.05),         # Huang et al. 2017, Table 2: 0.8M
    ("resnet50", 25_557_032, 0),                   # torchvision
    ("resnet101", 44_549_160, 0),                  # torchvision
    ("densenet121", 7_978_856, 0),                 # torchvision
])
def test_parameter_counts_match_published(name, published, tolerance):
  count = _params(name)
  assert abs(count - published) <= tolerance * published, count


def test_se_resnet50_parameter_count():
  assert abs(_params("resnet50", "se") - 28.1e6) < 0.05e6  # Hu et al. 2018: 28.1M (rounded)


@pytest.mark.parametrize("name", ["cifar_resnet56", "cifar_densenet40", "resnet50"])
def test_recalibration_overhead_is_a_small_fraction(name):
  base, se, ms = (_params(name, r) for r in ("none", "se", "ms_sar"))
  assert base < se < ms
  assert ms / base - 1 < 0.16


def _recalibration_sites(params):
  """Number of recalibration modules (scanned stacks count once per stacked block)."""
  sites = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    keys = [getattr(k, "key", "") for k in path]
    if "recalibration" in keys and keys[-2:] == ["expand", "bias"]:
      sites += leaf.shape[0] if leaf.ndim == 2 else 1
  return sites


@pytest.mark.parametrize("name,sites", [
    ("cifar_resnet20", 9), ("cifar_resnet110", 54), ("cifar_preact_resnet164", 54),
    ("cifar_densenet40", 36), ("cifar_densenet_bc100", 48), ("resnet50", 16),
    ("resnet101", 33), ("densenet121", 58)])
def test_one_recalibration_per_block(name, sites):
  model = get_model(name, num_classes=10, recalibration="ms_sar")
  params = _abstract_variables(model, input_size(name))["params"]
  assert _recalibration_sites(params) == sites


def _train_step(model, variables, images, labels):
  def loss_fn(params):
    logits, updates = model.apply({**variables, "params": params}, images, train=True,
                                  mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits, updates)
  return jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])


def _train_and_eval(model, variables, images, labels):
  return _train_step(model, variables, images, labels), model.apply(variables, images)


# One small member of each family is compiled and run (the function, not the size, is the
# point); every registered network is traced at full size by the parameter-count and
# recalibration-site tests above (shapes only, nothing compiled).
FAMILIES = {
    "cifar_resnet20": {"depth": 8}, "cifar_preact_resnet164": {"depth": 11},
    "cifar_densenet40": {"depth": 7}, "cifar_densenet_bc100": {"depth": 10},
    "resnet50": {"stage_sizes": (1, 1, 1, 1), "width": 8},
    "densenet121": {"block_sizes": (1, 1, 1, 1), "growth_rate": 8},
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_forward_and_backward(name):
  size = 32 if input_size(name) == 32 else 64
  kwargs = dict(FAMILIES[name], **({"scales": (2,)} if size == 64 else {}))
  model = get_model(name, num_classes=7, recalibration="ms_sar", **kwargs)
  images = jax.random.normal(jax.random.key(1), (2, size, size, 3))
  labels = jnp.array([0, 3])
  variables = model.init(jax.random.key(0), images[:1])
  ((loss, (logits, updates)), grads), eval_logits = jax.jit(_train_and_eval, static_argnums=0)(
      model, variables, images, labels)
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  assert bool(jnp.isfinite(loss))
  assert jax.tree.structure(grads) == jax.tree.structure(variables["params"])
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) > 0.9 * len(norms)
  # Train mode moves the BatchNorm statistics; eval mode uses them.
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), updates["batch_stats"],
                       variables["batch_stats"])
  assert max(jax.tree.leaves(moved)) > 0
  assert eval_logits.shape == (2, 7) and bool(jnp.isfinite(eval_logits).all())


@pytest.mark.parametrize("recalibration", ["none", "se"])
def test_forward_and_backward_other_recalibrations(recalibration):
  model = get_model("cifar_resnet20", num_classes=10, recalibration=recalibration)
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  variables = model.init(jax.random.key(0), images)
  (loss, _), grads = _train_step(model, variables, images, jnp.arange(4))
  assert bool(jnp.isfinite(loss)) and _count(grads) == _count(variables["params"])


def _unstack(params):
  """Maps scanned parameters ``stageK_blocks/block/...`` (stacked) to ``stageK_blocks_i/...``."""
  flat = flax.traverse_util.flatten_dict(params)
  out = {}
  for key, value in flat.items():
    if len(key) > 1 and key[1] == "block" and re.match(r"stage\d_blocks$", key[0]):
      for i in range(value.shape[0]):
        out[(f"{key[0]}_{i}",) + key[2:]] = value[i]
    else:
      out[key] = value
  return flax.traverse_util.unflatten_dict(out)


def test_scanned_blocks_equal_unrolled_blocks():
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  scanned = get_model("cifar_resnet20", num_classes=10, recalibration="ms_sar",
                      scan_blocks=True)
  unrolled = get_model("cifar_resnet20", num_classes=10, recalibration="ms_sar")
  variables = scanned.init(jax.random.key(0), images)
  as_unrolled = jax.tree.map(lambda x: x, {k: _unstack(v) for k, v in variables.items()})
  reference = unrolled.init(jax.random.key(0), images)
  assert jax.tree.structure(as_unrolled) == jax.tree.structure(reference)
  for train in (False, True):
    a = scanned.apply(variables, images, train=train, mutable=["batch_stats"] if train else False)
    b = unrolled.apply(as_unrolled, images, train=train, mutable=["batch_stats"] if train else False)
    a, b = (a[0], b[0]) if train else (a, b)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_compute_keeps_float32_params_and_statistics():
  model = get_model("cifar_resnet20", num_classes=10, recalibration="ms_sar",
                    dtype=jnp.bfloat16)
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  variables = model.init(jax.random.key(0), images)
  assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
  assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())
  assert {a.dtype for a in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}


def test_imagenet_defaults_fit_the_7x7_stage():
  model = get_model("resnet50", num_classes=1000, recalibration="ms_sar")
  assert model.recalibration.keywords["scales"] == (2, 4)
  with pytest.raises(ConfigError, match="scale 8 is larger than the 7x7 feature map"):
    _abstract_variables(get_model("resnet50", num_classes=1000, recalibration="ms_sar",
                                  scales=(2, 4, 8)), 224)


@pytest.mark.parametrize("call,match", [
    (lambda: get_model("resnet18", num_classes=10), "unknown model 'resnet18'; choose one of"),
    (lambda: get_model("cifar_resnet20", num_classes=10, recalibration="cbam"),
     "unknown recalibration 'cbam'"),
    (lambda: get_model("cifar_resnet20", num_classes=0), "num_classes must be a positive"),
    (lambda: get_model("cifar_resnet20", num_classes=10, recalibration="ms_sar", reduction=0),
     "reduction must be a positive number"),
    (lambda: get_model("cifar_resnet20", num_classes=10, recalibration="ms_sar", scales=(0,)),
     "every scale must be a positive integer"),
    (lambda: get_model("cifar_resnet20", num_classes=10, recalibration="ms_sar", scale=2),
     "unknown argument scale"),
    (lambda: get_model("cifar_resnet20", num_classes=10, reduction=8),
     "unknown argument reduction for recalibration 'none'"),
    (lambda: get_model("cifar_resnet20", num_classes=10, depth=21), "depth must be 6n\\+2"),
    (lambda: get_model("cifar_densenet40", num_classes=10, depth=41), "depth must be 3n\\+4"),
    (lambda: _abstract_variables(get_model("cifar_resnet20", num_classes=10,
                                           recalibration="ms_sar", scales=(16,)), 32),
     "scale 16 is larger than the 8x8 feature map"),
])
def test_bad_arguments_give_one_line_errors_before_compilation(call, match):
  with pytest.raises(ConfigError, match=match) as e:
    call()
  assert "\n" not in str(e.value)
