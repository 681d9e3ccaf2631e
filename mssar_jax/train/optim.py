"""Optimiser, learning-rate schedule and loss.

Schedule over T total steps with W warmup steps and peak rate eta
(eta = learning_rate * batch_size / reference_batch_size):

    warmup  (t < W):  eta * t / W
    step    (t >= W): eta * factor^k,  k = #{b in boundaries : t - W >= round(b * (T - W))}
    cosine  (t >= W): eta * (1 + cos(pi * (t - W) / (T - W))) / 2

Update (PyTorch's coupled SGD, as in the papers): with g = grad + wd * mask * w,

    v <- mu * v + g;   w <- w - lr * v                       (heavy ball)
    v <- mu * v + g;   w <- w - lr * (g + mu * v)            (Nesterov)

The weight-decay mask is 1 on every parameter except, when
``weight_decay_on_bn_and_bias`` is False, BatchNorm scales/offsets and biases (leaves named
'scale' or 'bias'; leaf names rather than ranks, because scanned blocks stack their 1-D
parameters into 2-D arrays).

Loss: cross-entropy against labels smoothed to (1 - a) * onehot + a / K (a = label_smoothing).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def peak_learning_rate(config) -> float:
  return config.learning_rate * config.batch_size / config.reference_batch_size


def warmup_steps(config, steps_per_epoch: int) -> int:
  if config.warmup_steps >= 0:
    return int(config.warmup_steps)
  return int(round(config.warmup_epochs * steps_per_epoch))


def make_schedule(config, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
  """The schedule in the module docstring; a function of the optimiser step count."""
  peak = peak_learning_rate(config)
  warm = min(warmup_steps(config, steps_per_epoch), total_steps)
  main_steps = max(total_steps - warm, 1)
  if config.lr_schedule == "cosine":
    main = optax.cosine_decay_schedule(peak, decay_steps=main_steps)
  else:
    boundaries = {int(round(b * main_steps)): config.lr_decay_factor
                  for b in config.lr_boundaries}
    main = optax.piecewise_constant_schedule(peak, boundaries)
  if warm == 0:
    return main
  ramp = optax.linear_schedule(0.0, peak, transition_steps=warm)
  return optax.join_schedules([ramp, main], boundaries=[warm])


def weight_decay_mask(params, decay_bn_and_bias: bool):
  """True for parameters that get weight decay (see module docstring)."""
  def decide(path, _):
    if decay_bn_and_bias:
      return True
    name = getattr(path[-1], "key", str(path[-1]))
    return name not in ("scale", "bias")
  return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """Coupled weight decay (masked) followed by SGD with (Nesterov) momentum."""
  decay = optax.add_decayed_weights(
      config.weight_decay,
      mask=lambda p: weight_decay_mask(p, config.weight_decay_on_bn_and_bias))
  return optax.chain(decay, optax.sgd(schedule, momentum=config.momentum or None,
                                      nesterov=config.nesterov))


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
  """Per-example cross-entropy in float32 with optional label smoothing."""
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
