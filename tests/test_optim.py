"""Learning-rate schedules, the weight-decay mask, SGD update and the loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mssar_jax.configs import cifar, imagenet
from mssar_jax.train import optim


def _config(**overrides):
  c = cifar.get_config("cifar10,cifar_resnet20,none")
  for k, v in overrides.items():
    c[k] = v
  return c


def test_step_schedule_divides_by_ten_at_half_and_three_quarters():
  sched = optim.make_schedule(_config(), total_steps=1000, steps_per_epoch=10)
  assert sched(0) == pytest.approx(0.1)
  assert sched(499) == pytest.approx(0.1)
  assert sched(500) == pytest.approx(0.01)
  assert sched(749) == pytest.approx(0.01)
  assert sched(750) == pytest.approx(0.001)


def test_linear_lr_scaling_with_batch():
  sched = optim.make_schedule(_config(batch_size=256), total_steps=100, steps_per_epoch=10)
  assert sched(0) == pytest.approx(0.2)


def test_warmup_then_step_boundaries_count_after_warmup():
  c = _config(warmup_steps=100)
  sched = optim.make_schedule(c, total_steps=1100, steps_per_epoch=10)
  assert sched(0) == pytest.approx(0.0)
  assert sched(50) == pytest.approx(0.05)
  assert sched(100) == pytest.approx(0.1)
  assert sched(599) == pytest.approx(0.1)   # boundary at 100 + 0.5 * 1000
  assert sched(600) == pytest.approx(0.01)


def test_imagenet_step_and_cosine_schedules():
  c = imagenet.get_config("resnet50,none")
  spe = 1000
  sched = optim.make_schedule(c, total_steps=90 * spe, steps_per_epoch=spe)
  assert sched(5 * spe) == pytest.approx(0.1)
  assert sched(30 * spe - 1) == pytest.approx(0.1)
  assert sched(30 * spe) == pytest.approx(0.01)
  assert sched(60 * spe) == pytest.approx(0.001)
  assert sched(80 * spe) == pytest.approx(0.0001)
  c = imagenet.get_config("resnet50,none,cosine")
  sched = optim.make_schedule(c, total_steps=90 * spe, steps_per_epoch=spe)
  assert sched(spe) == pytest.approx(0.02)
  assert sched(5 * spe + 85 * spe // 2) == pytest.approx(0.05, abs=1e-6)
  assert sched(90 * spe) == pytest.approx(0.0, abs=1e-7)


def test_weight_decay_mask_by_leaf_name_also_for_stacked_params():
  params = {"conv": {"kernel": jnp.ones((3, 3, 2, 2))},
            "bn": {"scale": jnp.ones((4, 2)), "bias": jnp.ones((4, 2))},  # scanned: 2-D
            "head": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}
  mask = optim.weight_decay_mask(params, decay_bn_and_bias=False)
  assert mask == {"conv": {"kernel": True}, "bn": {"scale": False, "bias": False},
                  "head": {"kernel": True, "bias": False}}
  assert all(jax.tree.leaves(optim.weight_decay_mask(params, decay_bn_and_bias=True)))


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_pytorch_coupled_weight_decay(nesterov):
  c = _config(nesterov=nesterov, weight_decay=0.1, weight_decay_on_bn_and_bias=False,
              momentum=0.9)
  lr, wd, mu = 0.5, 0.1, 0.9
  tx = optim.make_optimizer(c, lambda _: lr)
  params = {"w": {"kernel": jnp.array([1.0, -2.0])}, "b": {"bias": jnp.array([3.0])}}
  state = tx.init(params)
  w, b, vw, vb = np.array([1.0, -2.0]), np.array([3.0]), 0.0, 0.0
  for _ in range(3):
    grads = jax.tree.map(lambda p: 2 * p, params)            # d/dp p^2
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    gw, gb = 2 * w + wd * w, 2 * b                             # no decay on the bias
    vw, vb = mu * vw + gw, mu * vb + gb
    w = w - lr * (gw + mu * vw if nesterov else vw)
    b = b - lr * (gb + mu * vb if nesterov else vb)
  np.testing.assert_allclose(params["w"]["kernel"], w, rtol=1e-6)
  np.testing.assert_allclose(params["b"]["bias"], b, rtol=1e-6)


def test_label_smoothing_cross_entropy():
  logits = jnp.array([[2.0, 0.0, -1.0]])
  p = jax.nn.log_softmax(logits)[0]
  plain = optim.cross_entropy(logits, jnp.array([0]), 3)
  smooth = optim.cross_entropy(logits, jnp.array([0]), 3, label_smoothing=0.3)
  np.testing.assert_allclose(plain, [-p[0]], rtol=1e-6)
  target = np.array([0.7 + 0.1, 0.1, 0.1])
  np.testing.assert_allclose(smooth, [-(target * p).sum()], rtol=1e-6)
