"""One training step and one evaluation step, for ``jax.jit`` over a device mesh.

Images arrive as uint8 (the input pipeline sends a quarter of the bytes of float32) and are
normalised here, on the device: (x - mean) / std per channel in float32. The network computes
in its dtype; logits, loss and metrics are float32. No TensorFlow is imported.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mssar_jax import datasets
from mssar_jax.train import optim
from mssar_jax.train.state import TrainState

P = jax.sharding.PartitionSpec


def make_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh over all devices of all processes, axis 'data'."""
  return jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))


def normalise(images, stats: datasets.Dataset):
  """uint8 (or 0-255 float) images -> (x - mean) / std per channel, float32."""
  mean = jnp.asarray(stats.mean, jnp.float32)
  std = jnp.asarray(stats.std, jnp.float32)
  return (images.astype(jnp.float32) - mean) / std


def train_step(state: TrainState, batch, *, model, tx, schedule, stats: datasets.Dataset,
               label_smoothing: float = 0.0):
  """One SGD step on a global batch; returns the new state and the batch's mean metrics."""
  images = normalise(batch["image"], stats)

  def loss_fn(params):
    logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats},
                                  images, train=True, mutable=["batch_stats"])
    loss = optim.cross_entropy(logits, batch["label"], stats.num_classes,
                               label_smoothing).mean()
    return loss, (logits, updates["batch_stats"])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"train/loss": loss,
             "train/accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
             "train/learning_rate": schedule(state.step)}
  new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state)
  return new_state, metrics


def eval_step(state: TrainState, batch, *, model, stats: datasets.Dataset):
  """Masked sums over a padded eval batch: correct top-1/top-5, loss, example count."""
  logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                       normalise(batch["image"], stats), train=False)
  mask, labels = batch["mask"], batch["label"]
  loss = optim.cross_entropy(logits, labels, stats.num_classes)
  top1 = jnp.argmax(logits, -1) == labels
  _, top5_idx = jax.lax.top_k(logits, min(5, stats.num_classes))
  top5 = jnp.any(top5_idx == labels[:, None], axis=-1)
  return {"top1": jnp.sum(top1 & mask, dtype=jnp.int32),
          "top5": jnp.sum(top5 & mask, dtype=jnp.int32),
          "count": jnp.sum(mask, dtype=jnp.int32),
          "loss": jnp.sum(jnp.where(mask, loss, 0.0))}


@jax.jit
def all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))
