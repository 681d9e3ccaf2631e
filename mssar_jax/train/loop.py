"""``train_and_evaluate(config, workdir)``: the training loop, jit-sharded over all devices.

Distribution: one ``Mesh`` over all devices with axis 'data'. The train state is replicated
(``P()``), every batch is sharded along 'data' (``P('data')``) and assembled from the
per-process batches with ``jax.make_array_from_process_local_data``, two batches ahead of the
step. ``train_step`` is one ``jax.jit`` with the state donated; XLA inserts the gradient
all-reduce, and BatchNorm's batch statistics are those of the global batch.

Step t (1-based) applies the update computed on batch t-1 of the data stream and uses the
learning rate schedule(t-1). Logging, evaluation and checkpoints happen after step t when t is
a multiple of their interval and after the last step. A workdir (local or ``gs://``) that holds
a checkpoint is resumed from its newest readable step with the same data order (see
``mssar_jax.data``), so a run killed at any point and restarted ends with the same parameters
and ``metrics.jsonl``.

Failure handling: SIGTERM / SIGINT finish the running step, checkpoint it and return
(``preemption``); a non-finite loss or parameter raises FloatingPointError naming the step
before anything non-finite is saved; a bad config raises ConfigError before any compilation
and before the workdir is touched.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import time
from typing import Any, Iterator

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from mssar_jax import datasets
from mssar_jax import backends
from mssar_jax import config_lib
from mssar_jax import cpu_process
from mssar_jax import data
from mssar_jax.errors import ConfigError
from mssar_jax.storage import checkpoints
from mssar_jax.storage import metrics as metrics_lib
from mssar_jax.train import optim
from mssar_jax.train import preemption
from mssar_jax.train import progress as progress_lib
from mssar_jax.train import state as state_lib
from mssar_jax.train import step as step_lib

P = jax.sharding.PartitionSpec


@dataclasses.dataclass
class Run:
  """Everything the loop needs, built and checked before the workdir is touched."""
  config: Any
  workdir: epath.Path
  info: data.DataInfo
  builder: Any
  total_steps: int
  impl: backends.Choice
  init_fn: Any
  abstract: Any
  step_fn: Any
  eval_fn: Any
  replicated: Any
  data_sharding: Any
  local_batch: int
  local_eval_batch: int


def header(config) -> list[str]:
  """The run's first lines: backend and devices, and what a user should know about them."""
  devices, processes = jax.devices(), jax.process_count()
  line = (f"JAX {jax.__version__} on {jax.default_backend()}: {len(devices)} "
          f"{devices[0].device_kind} device{'s' if len(devices) > 1 else ''} in "
          f"{processes} process{'es' if processes > 1 else ''}")
  if processes > 1 and not preemption.synchronised():
    line += ("; WARNING: preemption cannot be synchronised across processes (the JAX "
             "distributed service is not running): SIGTERM will not save a checkpoint; call "
             "jax.distributed.initialize() first (train does so where JAX detects a cluster)")
  lines = [line]
  plugins = cpu_process.accelerator_plugins()
  if plugins and jax.default_backend() == "cpu":
    lines.append(f"WARNING: {', '.join(plugins)} installed but JAX runs on the CPU; check the "
                 "accelerator (e.g. nvidia-smi) and that the plugin matches jax "
                 f"{jax.__version__}.")
  del config
  return lines


def set_compilation_cache(config) -> str:
  """Turns on JAX's persistent compilation cache (config.compilation_cache_dir); returns the
  directory, or why it is off."""
  directory = config.compilation_cache_dir
  if jax.default_backend() == "cpu" and jax.process_count() > 1:
    # jax 0.12.1: CPU processes joined by jax.distributed hang in their first collective when
    # they load the step from a warm cache (tests/test_reliability.py's two-process run).
    jax.config.update("jax_enable_compilation_cache", False)
    return "off (several CPU processes)"
  if directory == "auto":
    directory = (os.environ.get("JAX_COMPILATION_CACHE_DIR")
                 or os.path.join(os.path.expanduser("~"), ".cache", "mssar_jax", "jax"))
  if directory:
    jax.config.update("jax_compilation_cache_dir", directory)  # (what takes >= 1 s to build:
    # jax_persistent_cache_min_compile_time_secs, or $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS)
  return directory


def build(config, workdir) -> Run:
  """Checks the config, finds the data, builds the model and the compiled steps' inputs."""
  process, processes = jax.process_index(), jax.process_count()
  config_lib.validate(config, jax.device_count(), processes)
  local_batch = config.batch_size // processes
  local_eval_batch = (config.eval_batch_size or config.batch_size) // processes
  builder = data.get_builder(config, process_index=process, process_count=processes)
  info = data.get_info(config, builder, local_batch=local_batch,
                       local_eval_batch=local_eval_batch, process_index=process,
                       process_count=processes)
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else int(config.num_epochs * info.steps_per_epoch))
  choice = backends.choose(config.implementation, dtype=state_lib.compute_dtype(config))
  model = state_lib.create_model(config, info.num_classes, choice.impl)
  schedule = optim.make_schedule(config, total_steps, info.steps_per_epoch)
  tx = optim.make_optimizer(config, schedule)
  init_fn = functools.partial(state_lib.init_state, model=model, tx=tx,
                              image_size=info.image_size)
  abstract = jax.eval_shape(init_fn, jax.random.key(config.seed))  # raises on shape errors
  mesh = step_lib.make_mesh()
  replicated = jax.sharding.NamedSharding(mesh, P())
  data_sharding = jax.sharding.NamedSharding(mesh, P("data"))
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)
  stats = datasets.get(config.dataset)
  step_fn = jax.jit(
      functools.partial(step_lib.train_step, model=model, tx=tx, schedule=schedule,
                        stats=stats, label_smoothing=config.label_smoothing),
      in_shardings=(replicated, data_sharding), out_shardings=(replicated, replicated),
      donate_argnums=(0,))
  eval_fn = jax.jit(functools.partial(step_lib.eval_step, model=model, stats=stats),
                    in_shardings=(replicated, data_sharding), out_shardings=replicated)
  return Run(config, _workdir(workdir), info, builder, total_steps, choice, init_fn, abstract,
             step_fn, eval_fn, replicated, data_sharding, local_batch, local_eval_batch)


def _workdir(workdir) -> epath.Path:
  path = epath.Path(workdir)
  if path.exists() and not path.is_dir():
    raise ConfigError(f"--workdir {workdir} is a file; pass a directory (new or a run's).")
  return path


def restore_or_init(run: Run, ckpt: checkpoints.Checkpointer):
  """(start step, state): the newest readable checkpoint, or a fresh initialisation."""
  meta = state_lib.checkpoint_meta(run.config, run.info.image_size)
  start_step, state = ckpt.restore_latest(run.abstract, meta)
  if not start_step:
    # Eager (op-by-op) init: jitting it compiles one threefry kernel per parameter, which is
    # much slower than running them for the deep networks on CPU.
    state = jax.device_put(run.init_fn(jax.random.key(run.config.seed)), run.replicated)
  return start_step, state


def evaluate(eval_fn, state, dataset, data_sharding, top5: bool) -> dict[str, float]:
  """Runs the whole padded eval set; returns eval/loss, eval/accuracy (and top-5)."""
  totals = None
  for batch in prefetch(dataset.as_numpy_iterator(), data_sharding):
    sums = eval_fn(state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = int(totals["count"])
  out = {"eval/loss": float(totals["loss"]) / count,
         "eval/accuracy": int(totals["top1"]) / count}
  if top5:
    out["eval/top5_accuracy"] = int(totals["top5"]) / count
  out["eval/num_examples"] = count
  return out


def prefetch(batches: Iterator[dict], sharding, size: int = 2) -> Iterator[dict]:
  """Global arrays of the process-local numpy batches, ``size`` transfers in flight."""
  queue = collections.deque()
  for batch in batches:
    queue.append(jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                              batch))
    if len(queue) == size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def _mean_metrics(pending: list[dict], first_step: int) -> dict[str, float]:
  """Averages the per-step metrics; FloatingPointError naming the first non-finite step."""
  values = jax.device_get(pending)
  for i, m in enumerate(values):
    if not np.isfinite(m["train/loss"]):
      raise FloatingPointError(f"training loss is {m['train/loss']} at step {first_step + i}; "
                               "stopping without saving a checkpoint (lower the learning rate "
                               "or check the data).")
  return {k: float(np.mean([m[k] for m in values])) for k in values[0]}


def _due(step: int, every: int, last: int) -> bool:
  return step == last or (every > 0 and step % every == 0)


def train_and_evaluate(config, workdir) -> dict[str, Any]:
  """Trains and evaluates ``config`` in ``workdir`` (resuming if it holds a checkpoint).

  Returns the final eval metrics plus 'step' and 'resumed_from' (the step it started at; and
  'preempted', the signal, if one stopped it).
  Raises ConfigError, before compiling anything or touching the workdir, for an invalid
  config or missing dataset.
  """
  data.hide_accelerators_from_tensorflow()
  process = jax.process_index()
  lines = header(config)
  cache = set_compilation_cache(config)
  run = build(config, workdir)
  run.workdir.mkdir(parents=True, exist_ok=True)
  ckpt = checkpoints.Checkpointer(run.workdir, keep=config.keep_checkpoints,
                                  async_save=config.async_checkpointing)
  start_step, state = restore_or_init(run, ckpt)
  if process == 0:
    metrics_lib.write_config(run.workdir, config)
  writer = metrics_lib.MetricsWriter(run.workdir, resume_step=start_step, enabled=process == 0,
                                     tensorboard=config.tensorboard)
  progress = progress_lib.Progress(total_steps=run.total_steps, start_step=start_step,
                                   global_batch=config.batch_size, enabled=process == 0)
  for line in lines + [_describe(run, start_step), f"implementation: {run.impl.impl.name} "
                       f"({run.impl.reason}); compilation cache: {cache or 'off'}"]:
    progress.print(line)
  try:
    result = {**_loop(run, state, start_step, ckpt, writer, progress),
              "resumed_from": start_step}
  finally:
    ckpt.close()
    writer.close()
  if result.get("preempted"):
    progress.print(f"stopped by {result['preempted']} after step {result['step']}/"
                   f"{run.total_steps}; checkpoint saved in {ckpt.directory}; run the same "
                   "command again to resume.")
  else:
    progress.summary(result["step"], {k: v for k, v in result.items()
                                      if k.startswith("eval/") and k != "eval/num_examples"},
                     str(run.workdir))
  return result


def _describe(run: Run, start_step: int) -> str:
  c, processes = run.config, jax.process_count()
  per_epoch = run.info.steps_per_epoch * processes * run.local_batch // c.batch_size
  return (f"{c.model} + {c.recalibration} on {c.dataset}: {run.total_steps} steps of "
          f"{c.batch_size} images, {per_epoch} steps/epoch, "
          f"{'resuming at step %d' % start_step if start_step else 'from scratch'}; "
          f"workdir {run.workdir}")


def _loop(run: Run, state, start_step: int, ckpt, writer, progress) -> dict[str, Any]:
  """The training loop proper; returns the final eval metrics and 'step'."""
  config, process, processes = run.config, jax.process_index(), jax.process_count()
  meta = state_lib.checkpoint_meta(config, run.info.image_size)
  train_data = data.TrainData(config, run.builder, run.info, local_batch=run.local_batch,
                              process_index=process, process_count=processes)
  eval_data = data.eval_dataset(config, run.builder, run.info, local_batch=run.local_eval_batch,
                                process_index=process, process_count=processes)
  batches = prefetch(train_data.iterate(start_step), run.data_sharding)
  run_eval = functools.partial(evaluate, run.eval_fn, dataset=eval_data,
                               data_sharding=run.data_sharding,
                               top5=run.info.num_classes > 10)
  eval_metrics, pending, step, preempted = {}, [], start_step, None
  with preemption.PreemptionWatcher(processes) as watcher:
    for step in range(start_step + 1, run.total_steps + 1):
      state, metrics = run.step_fn(state, next(batches))
      pending.append(metrics)
      if step == start_step + 1:
        jax.block_until_ready(metrics)
        progress.first_step_done(step)
      stop = watcher.should_stop(step)
      save = stop or _due(step, config.checkpoint_every_steps, run.total_steps)
      record: dict[str, float] = {}
      # Train metrics are flushed at every checkpoint too, so a run resumed from any
      # checkpoint writes exactly the lines an uninterrupted run writes.
      if pending and (save or _due(step, config.log_every_steps, run.total_steps)):
        record.update(_mean_metrics(pending, step - len(pending) + 1))
        pending = []
      if _due(step, config.eval_every_steps, run.total_steps):
        started = time.time()
        eval_metrics = run_eval(state)
        progress.exclude(time.time() - started)
        record.update(eval_metrics)
      if record:
        writer.write(step, record, train_seconds=progress.train_seconds(step),
                     images_per_second=progress.images_per_second(step))
        progress.update(step, {k: v for k, v in record.items() if k != "eval/num_examples"})
      if save:
        if not bool(step_lib.all_finite(state.params)):
          raise FloatingPointError(f"the parameters are not finite after step {step}; "
                                   "stopping without saving a checkpoint (lower the learning "
                                   "rate or check the data).")
        started = time.time()
        ckpt.save(step, state, meta)
        progress.exclude(time.time() - started)
      if stop:
        preempted = watcher.signal_name
        break
    if preempted is None and not eval_metrics:
      eval_metrics = run_eval(state)  # resumed after the last step was saved
    ckpt.close()  # waits for the last checkpoint; signals are still held until it is written
  if preempted:
    return {"step": step, "preempted": preempted}
  return {"step": max(start_step, run.total_steps), **eval_metrics}
