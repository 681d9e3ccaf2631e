"""``train_and_evaluate(config, workdir)``: the training loop, jit-sharded over all devices.

Distribution: one ``Mesh`` over all devices with axis 'data'. The train state is replicated
(``P()``), every batch is sharded along 'data' (``P('data')``) and assembled from the
per-process batches with ``jax.make_array_from_process_local_data``. ``train_step`` is one
``jax.jit`` with the state donated; XLA inserts the gradient all-reduce, and BatchNorm's batch
statistics are those of the global batch (the model's BatchNorm has no axis_name).

Step t (1-based) applies the update computed on batch t-1 of the data stream and uses the
learning rate schedule(t-1). Logging, evaluation and checkpoints happen after step t when t is
a multiple of their interval and after the last step. A workdir that holds a checkpoint is
resumed from its newest readable step with the same data order (see ``input_pipeline``), so a
run killed at any point and restarted ends with the same parameters and ``metrics.jsonl``.

Failure handling: SIGTERM / SIGINT finish the running step, checkpoint it and return
(``preemption``); a non-finite loss or parameter raises FloatingPointError naming the step
before anything non-finite is saved; a bad config raises ConfigError before any compilation
and before the workdir is touched.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow as tf

from mssar_jax import checkpointing
from mssar_jax import config_lib
from mssar_jax import input_pipeline
from mssar_jax import metrics_writer
from mssar_jax import optim
from mssar_jax import preemption
from mssar_jax import progress as progress_lib
from mssar_jax.errors import ConfigError
from mssar_jax.models import get_model
from mssar_jax.native import onednn_conv

P = jax.sharding.PartitionSpec


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def create_model(config, num_classes: int):
  """The configured network; compute in bf16 when ``half_precision`` (params stay f32)."""
  dtype = jnp.bfloat16 if config.half_precision else jnp.float32
  kwargs = {**config.model_kwargs.to_dict(), **config.recalibration_kwargs.to_dict()}
  return get_model(config.model, num_classes=num_classes, recalibration=config.recalibration,
                   dtype=dtype, **kwargs)


def make_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh over all devices of all processes, axis 'data'."""
  return jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))


def init_state(key, model, tx, image_size: int) -> TrainState:
  variables = model.init(key, jnp.zeros((1, image_size, image_size, 3), jnp.float32),
                         train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))


def train_step(state: TrainState, batch, *, model, tx, schedule, num_classes: int,
               label_smoothing: float):
  """One SGD step on a global batch; returns the new state and the batch's mean metrics."""
  def loss_fn(params):
    logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats},
                                  batch["image"], train=True, mutable=["batch_stats"])
    loss = optim.cross_entropy(logits, batch["label"], num_classes, label_smoothing).mean()
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


def eval_step(state: TrainState, batch, *, model, num_classes: int):
  """Masked sums over a padded eval batch: correct top-1/top-5, loss, example count."""
  logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                       batch["image"], train=False)
  mask = batch["mask"]
  labels = batch["label"]
  loss = optim.cross_entropy(logits, labels, num_classes)
  top1 = jnp.argmax(logits, -1) == labels
  _, top5_idx = jax.lax.top_k(logits, min(5, num_classes))
  top5 = jnp.any(top5_idx == labels[:, None], axis=-1)
  return {"top1": jnp.sum(top1 & mask, dtype=jnp.int32),
          "top5": jnp.sum(top5 & mask, dtype=jnp.int32),
          "count": jnp.sum(mask, dtype=jnp.int32),
          "loss": jnp.sum(jnp.where(mask, loss, 0.0))}


def evaluate(eval_fn, state, dataset, data_sharding, top5: bool) -> dict[str, float]:
  """Runs the whole padded eval set; returns eval/loss, eval/accuracy (and eval/top5)."""
  totals = None
  for batch in dataset.as_numpy_iterator():
    sums = eval_fn(state, _global(batch, data_sharding))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = int(totals["count"])
  out = {"eval/loss": float(totals["loss"]) / count,
         "eval/accuracy": int(totals["top1"]) / count}
  if top5:
    out["eval/top5_accuracy"] = int(totals["top5"]) / count
  out["eval/num_examples"] = count
  return out


def _global(batch, sharding):
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def _mean_metrics(pending: list[dict], first_step: int) -> dict[str, float]:
  """Averages the per-step metrics; FloatingPointError naming the first non-finite step."""
  values = jax.device_get(pending)
  for i, m in enumerate(values):
    if not np.isfinite(m["train/loss"]):
      raise FloatingPointError(f"training loss is {m['train/loss']} at step {first_step + i}; "
                               "stopping without saving a checkpoint (lower the learning rate "
                               "or check the data).")
  return {k: float(np.mean([m[k] for m in values])) for k in values[0]}


def checkpoint_meta(config, info) -> dict[str, Any]:
  """What a checkpoint must agree on to be resumed (JSON-normalised)."""
  meta = {"model": config.model, "recalibration": config.recalibration,
          "dataset": config.dataset, "num_classes": info.num_classes,
          "image_size": info.image_size, "model_kwargs": config.model_kwargs.to_dict(),
          "recalibration_kwargs": config.recalibration_kwargs.to_dict()}
  return json.loads(json.dumps(meta))


def _plural(n: int, one: str, many: str | None = None) -> str:
  return f"{n} {one if n == 1 else (many or one + 's')}"


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _due(step: int, every: int, last: int) -> bool:
  return step == last or (every > 0 and step % every == 0)


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains and evaluates ``config`` in ``workdir`` (resuming if it holds a checkpoint).

  Returns the final eval metrics plus 'step'. Raises ConfigError, before compiling anything
  or touching the workdir, for an invalid config or missing dataset.
  """
  tf.config.set_visible_devices([], "GPU")  # tf.data only; keep accelerators for JAX
  process, num_processes = jax.process_index(), jax.process_count()
  config_lib.validate(config, jax.device_count(), num_processes)
  local_batch = config.batch_size // num_processes
  local_eval_batch = (config.eval_batch_size or config.batch_size) // num_processes

  # ---- Data and model, checked before anything is compiled or written. ----
  builder = input_pipeline.get_builder(config)
  info = input_pipeline.get_info(config, builder, local_batch=local_batch,
                                 local_eval_batch=local_eval_batch, process_index=process,
                                 process_count=num_processes)
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else int(config.num_epochs * info.steps_per_epoch))
  model = create_model(config, info.num_classes)
  schedule = optim.make_schedule(config, total_steps, info.steps_per_epoch)
  tx = optim.make_optimizer(config, schedule)
  init_fn = functools.partial(init_state, model=model, tx=tx, image_size=info.image_size)
  abstract = jax.eval_shape(init_fn, jax.random.key(config.seed))  # raises on shape errors

  # ---- Mesh, shardings and compiled steps. ----
  mesh = make_mesh()
  replicated = jax.sharding.NamedSharding(mesh, P())
  data_sharding = jax.sharding.NamedSharding(mesh, P("data"))
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)
  step_fn = jax.jit(
      functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                        num_classes=info.num_classes, label_smoothing=config.label_smoothing),
      in_shardings=(replicated, data_sharding), out_shardings=(replicated, replicated),
      donate_argnums=(0,))
  eval_fn = jax.jit(functools.partial(eval_step, model=model, num_classes=info.num_classes),
                    in_shardings=(replicated, data_sharding), out_shardings=replicated)

  # ---- Workdir, checkpoint resume, outputs. ----
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir} is a file; pass a directory (new or a run's).")
  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints,
                                    async_save=config.async_checkpointing)
  meta = checkpoint_meta(config, info)
  start_step, state = ckpt.restore_latest(abstract, meta)
  if start_step:
    logging.info("resumed from %s at step %d", ckpt.directory, start_step)
  else:
    # Eager (op-by-op) init: jitting it compiles one threefry kernel per parameter, which
    # took 146 s for cifar_resnet110 on CPU against 13 s eagerly.
    state = jax.device_put(init_fn(jax.random.key(config.seed)), replicated)
  if process == 0:
    metrics_writer.write_config(workdir, config)
  writer = metrics_writer.MetricsWriter(workdir, resume_step=start_step, enabled=process == 0)
  progress = progress_lib.Progress(total_steps=total_steps, start_step=start_step,
                                   global_batch=config.batch_size, enabled=process == 0)
  progress.print(
      f"{config.model} + {config.recalibration} on {config.dataset}: {total_steps} steps of "
      f"{config.batch_size} images on {_plural(jax.device_count(), 'device')} in "
      f"{_plural(num_processes, 'process', 'processes')}, {info.steps_per_epoch * num_processes * local_batch // config.batch_size} "
      f"steps/epoch, {'resuming at step %d' % start_step if start_step else 'from scratch'}")
  progress.print(f"convolutions: {onednn_conv.conv_impl()}" + (
      f" (oneDNN unavailable: {onednn_conv.unavailable_reason()})"
      if onednn_conv.unavailable_reason() else ""))

  train_data = input_pipeline.TrainData(config, builder, info, local_batch=local_batch,
                                        process_index=process, process_count=num_processes)
  eval_data = input_pipeline.eval_dataset(config, builder, info, local_batch=local_eval_batch,
                                          process_index=process, process_count=num_processes)
  top5 = input_pipeline._is_imagenet(config)  # pylint: disable=protected-access
  run_eval = functools.partial(evaluate, eval_fn, dataset=eval_data,
                               data_sharding=data_sharding, top5=top5)

  # ---- The loop. ----
  eval_metrics: dict[str, float] = {}
  pending: list[dict] = []
  batches = train_data.iterate(start_step)
  step = start_step
  preempted = None
  try:
    with preemption.PreemptionWatcher(num_processes) as watcher:
      for step in range(start_step + 1, total_steps + 1):
        state, metrics = step_fn(state, _global(next(batches), data_sharding))
        pending.append(metrics)
        if step == start_step + 1:
          jax.block_until_ready(metrics)
          progress.first_step_done(step)
        stop = watcher.should_stop(step)
        save = stop or _due(step, config.checkpoint_every_steps, total_steps)
        record: dict[str, float] = {}
        # Train metrics are flushed at every checkpoint too, so a run resumed from any
        # checkpoint writes exactly the lines an uninterrupted run writes.
        if pending and (save or _due(step, config.log_every_steps, total_steps)):
          record.update(_mean_metrics(pending, step - len(pending) + 1))
          pending = []
        if _due(step, config.eval_every_steps, total_steps):
          started = time.time()
          eval_metrics = run_eval(state)
          progress.exclude(time.time() - started)
          record.update(eval_metrics)
        if record:
          writer.write(step, record, train_seconds=progress.train_seconds(step),
                       images_per_second=progress.images_per_second(step))
          progress.update(step, {k: v for k, v in record.items() if k != "eval/num_examples"})
        if save:
          if not bool(_all_finite(state.params)):
            raise FloatingPointError(f"the parameters are not finite after step {step}; "
                                     "stopping without saving a checkpoint (lower the learning "
                                     "rate or check the data).")
          ckpt.save(step, state, meta)
        if stop:
          preempted = watcher.signal_name
          break
      if preempted is None and not eval_metrics:
        eval_metrics = run_eval(state)  # resumed after the last step was saved
      ckpt.close()  # waits for the last checkpoint; signals are still held until it is written
  finally:
    ckpt.close()
    writer.close()
  if preempted:
    progress.print(f"stopped by {preempted} after step {step}/{total_steps}; checkpoint saved "
                   f"in {ckpt.directory}; run the same command again to resume.")
    return {"step": step, "preempted": True}
  final_step = max(start_step, total_steps)
  progress.summary(final_step, {k: v for k, v in eval_metrics.items()
                                if k != "eval/num_examples"}, workdir)
  return {"step": final_step, **eval_metrics}
