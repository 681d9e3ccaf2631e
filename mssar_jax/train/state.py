"""The train state and the network a config describes (no TensorFlow needed)."""

from __future__ import annotations

import json
from typing import Any

import flax
import jax
import jax.numpy as jnp

from mssar_jax import datasets
from mssar_jax.models import Implementation, get_model


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def compute_dtype(config):
  return jnp.bfloat16 if config.half_precision else jnp.float32


def create_model(config, num_classes: int, impl: Implementation = Implementation()):
  """The configured network; compute in bf16 when ``half_precision`` (params stay f32)."""
  kwargs = {**config.model_kwargs.to_dict(), **config.recalibration_kwargs.to_dict()}
  return get_model(config.model, num_classes=num_classes, recalibration=config.recalibration,
                   dtype=compute_dtype(config), impl=impl, **kwargs)


def init_state(key, model, tx, image_size: int) -> TrainState:
  variables = model.init(key, jnp.zeros((1, image_size, image_size, 3), jnp.float32),
                         train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))


def checkpoint_meta(config, image_size: int) -> dict[str, Any]:
  """What a checkpoint must agree on to be resumed (JSON-normalised)."""
  meta = {"model": config.model, "recalibration": config.recalibration,
          "dataset": config.dataset,
          "num_classes": datasets.get(config.dataset).num_classes,
          "image_size": image_size, "model_kwargs": config.model_kwargs.to_dict(),
          "recalibration_kwargs": config.recalibration_kwargs.to_dict()}
  return json.loads(json.dumps(meta))
