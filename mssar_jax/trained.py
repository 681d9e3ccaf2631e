"""Loading a trained workdir: ``load(workdir, step=None) -> Trained(config, model, variables)``.

    from mssar_jax import trained
    run = trained.load("runs/local")              # newest checkpoint; step=30 for another
    logits = run.model.apply(run.variables, images, train=False)

The config comes from ``<workdir>/config.json`` (written by the trainer), the network from
``mssar_jax.train.create_model``, and the state from the checkpoint through
``mssar_jax.checkpointing.Checkpointer.restore`` onto the abstract state of
``jax.eval_shape(mssar_jax.train.init_state)`` (so a checkpoint of another model is refused
the same way the trainer refuses it). The class count and image size are read from the
checkpoint's own meta data (``checkpoints/<step>/meta/metadata``, JSON), so no dataset is
needed to load a run. Nothing in the workdir is written.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import types
from typing import Any

import jax
import ml_collections

from mssar_jax.errors import ConfigError

_NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet2012": 1000}


@dataclasses.dataclass
class Trained:
  """A restored run: its config, the network, ``{'params', 'batch_stats'}`` and the step."""
  config: ml_collections.ConfigDict
  model: Any
  variables: dict[str, Any]
  step: int
  num_classes: int
  image_size: int

  def __iter__(self):  # config, model, variables = load(workdir)
    return iter((self.config, self.model, self.variables))


def _tuples(value):
  """JSON lists back to tuples (the trainer's configs hold tuples, e.g. scales)."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """``<workdir>/config.json`` as a ConfigDict (ConfigError if it is missing)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise ConfigError(f"{path} not found; pass the --workdir of a training run "
                      "(it holds config.json, metrics.jsonl and checkpoints/).")
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps of the committed checkpoints in ``<workdir>/checkpoints`` (sorted)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory)
                if name.isdigit() and os.path.isdir(os.path.join(directory, name, "state")))


def _saved_meta(workdir: str, step: int) -> dict[str, Any]:
  path = os.path.join(workdir, "checkpoints", str(step), "meta", "metadata")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def load(workdir: str, step: int | None = None) -> Trained:
  """Restores checkpoint ``step`` (default: the newest) of ``workdir``.

  Raises ConfigError (one line) when the workdir has no config.json, no checkpoint, or not
  the requested step.
  """
  # Imported here: importing the trainer pulls in TensorFlow (for tf.data).
  from mssar_jax import checkpointing  # pylint: disable=import-outside-toplevel
  from mssar_jax import optim  # pylint: disable=import-outside-toplevel
  from mssar_jax import train  # pylint: disable=import-outside-toplevel

  workdir = os.path.abspath(workdir)
  config = read_config(workdir)
  steps = checkpoint_steps(workdir)
  if not steps:
    raise ConfigError(f"no checkpoint in {workdir}/checkpoints; train first (or wait for the "
                      "first checkpoint_every_steps).")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ConfigError(f"no checkpoint {step} in {workdir}/checkpoints; available: "
                      f"{', '.join(map(str, steps))}.")
  saved = _saved_meta(workdir, step)
  from mssar_jax import models  # pylint: disable=import-outside-toplevel
  num_classes = int(saved.get("num_classes") or _NUM_CLASSES.get(config.dataset, 0))
  if not num_classes:
    raise ConfigError(f"cannot tell the number of classes of {workdir} (dataset "
                      f"{config.dataset!r}, no checkpoint meta data).")
  image_size = int(saved.get("image_size") or config.get("image_size", 0)
                   or models.input_size(config.model))
  info = types.SimpleNamespace(num_classes=num_classes, image_size=image_size)

  model = train.create_model(config, num_classes)
  # The optimiser only shapes the abstract opt_state; the schedule's values do not matter.
  total = max(int(config.get("num_train_steps", 1)), 1)
  schedule = optim.make_schedule(config, total, 1)
  tx = optim.make_optimizer(config, schedule)
  init_fn = functools.partial(train.init_state, model=model, tx=tx, image_size=image_size)
  abstract = jax.eval_shape(init_fn, jax.random.key(int(config.get("seed", 0))))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
  ckpt = checkpointing.Checkpointer(workdir, keep=max(int(config.get("keep_checkpoints", 1)),
                                                      len(steps)), async_save=False)
  try:
    state = ckpt.restore(step, abstract, train.checkpoint_meta(config, info))
  finally:
    ckpt.close()
  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  return Trained(config=config, model=model, variables=variables, step=int(step),
                 num_classes=num_classes, image_size=image_size)
