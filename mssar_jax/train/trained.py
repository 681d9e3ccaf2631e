"""Loading a trained workdir: ``load(workdir, step=None) -> Trained(config, model, variables)``.

    from mssar_jax.train import trained
    run = trained.load("runs/local")              # newest checkpoint; step=30 for another
    logits = run.model.apply(run.variables, images, train=False)

The config comes from ``<workdir>/config.json`` (written by the trainer), the network from
``train.state.create_model``, and the state from the checkpoint through
``storage.checkpoints.Checkpointer.restore`` onto the abstract state of
``jax.eval_shape(train.state.init_state)`` (so a checkpoint of another model is refused the
same way the trainer refuses it). No dataset is needed, the workdir may be ``gs://``, and
nothing in it is written.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

from etils import epath
import jax
import ml_collections

from mssar_jax import datasets
from mssar_jax import config_lib
from mssar_jax.errors import ConfigError
from mssar_jax.storage import checkpoints
from mssar_jax.train import optim
from mssar_jax.train import state as state_lib


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


def read_config(workdir) -> ml_collections.ConfigDict:
  """``<workdir>/config.json`` as a ConfigDict (ConfigError if it is missing)."""
  path = epath.Path(workdir) / "config.json"
  if not path.is_file():
    raise ConfigError(f"{path} not found; pass the --workdir of a training run "
                      "(it holds config.json, metrics.jsonl and checkpoints/).")
  return ml_collections.ConfigDict(_tuples(json.loads(path.read_text())))


def load(workdir, step: int | None = None) -> Trained:
  """Restores checkpoint ``step`` (default: the newest) of ``workdir``.

  Raises ConfigError (one line) when the workdir has no config.json, no checkpoint, or not
  the requested step.
  """
  config = read_config(workdir)
  num_classes = datasets.get(config.dataset).num_classes
  image_size = config_lib.image_size(config)
  model = state_lib.create_model(config, num_classes)
  # The optimiser only shapes the abstract opt_state; the schedule's values do not matter.
  tx = optim.make_optimizer(config, optim.make_schedule(config, 1, 1))
  init_fn = functools.partial(state_lib.init_state, model=model, tx=tx, image_size=image_size)
  abstract = jax.eval_shape(init_fn, jax.random.key(int(config.get("seed", 0))))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
  ckpt = checkpoints.Checkpointer(workdir, keep=1_000_000, async_save=False, create=False)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise ConfigError(f"no checkpoint in {ckpt.directory}; train first (or wait for the "
                        "first checkpoint_every_steps).")
    step = steps[-1] if step is None else step
    if step not in steps:
      raise ConfigError(f"no checkpoint {step} in {ckpt.directory}; available: "
                        f"{', '.join(map(str, steps))}.")
    state = ckpt.restore(step, abstract, state_lib.checkpoint_meta(config, image_size))
  finally:
    ckpt.close()
  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  return Trained(config=config, model=model, variables=variables, step=int(step),
                 num_classes=num_classes, image_size=image_size)
