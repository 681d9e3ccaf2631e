"""The trainer's configuration: every key with its default, argument parsing, validation.

Experiment files in ``configs/`` start from ``base_config()`` and override what their recipe
says; ``train.py --config configs/cifar.py:cifar10,cifar_resnet20,ms_sar`` passes the text
after ':' to their ``get_config(arg)``, which splits it with ``parse_args``.

Learning rate. ``learning_rate`` is the rate at ``reference_batch_size``; the trainer uses
``learning_rate * batch_size / reference_batch_size`` (linear scaling, Goyal et al. 2017), so
the recipes stay right when only ``--config.batch_size`` changes.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections

from mssar_jax import backends
from mssar_jax import datasets
from mssar_jax import models
from mssar_jax import recalibration
from mssar_jax.errors import ConfigError


SCHEDULES = ("step", "cosine")
_SIMPLE = (bool, int, float, str, tuple, type(None))




def base_config() -> ml_collections.ConfigDict:
  """All trainer keys with neutral defaults (a recipe file sets the real values)."""
  c = ml_collections.ConfigDict()
  # Model.
  c.model = "cifar_resnet20"
  c.recalibration = "none"
  c.recalibration_kwargs = ml_collections.ConfigDict()  # e.g. reduction, scales, kernel_size
  c.model_kwargs = ml_collections.ConfigDict()          # e.g. zero_init_residual, depth
  c.half_precision = False        # bf16 compute; params, BN statistics and loss stay float32
  c.implementation = "auto"       # how layers are computed: auto | xla | cpu (backends.choose)
  # Data.
  c.dataset = "cifar10"
  c.data_dir = ""                # "": $TFDS_DATA_DIR, else TFDS's default
  c.download = False              # let TFDS download and prepare the data if it is missing
  c.train_split = "train"
  c.eval_split = "test"
  c.image_size = 0                # 0: the model's design size (32 CIFAR, 224 ImageNet)
  c.shuffle_buffer = 50_000
  c.shuffle_files = False         # True for sharded datasets such as ImageNet
  c.cache = True                  # keep decoded train / preprocessed eval data in memory
  c.prefetch = 2                  # batches prepared ahead of the device
  # Optimisation.
  c.batch_size = 128              # global batch, split over all devices
  c.eval_batch_size = 0           # 0: batch_size
  c.num_epochs = 164
  c.num_train_steps = -1          # > 0 overrides num_epochs
  c.learning_rate = 0.1
  c.reference_batch_size = 128
  c.lr_schedule = "step"
  c.lr_boundaries = (0.5, 0.75)   # step schedule: fractions of training after warmup
  c.lr_decay_factor = 0.1
  c.warmup_epochs = 0.0
  c.warmup_steps = -1             # >= 0 overrides warmup_epochs
  c.momentum = 0.9
  c.nesterov = False
  c.weight_decay = 1e-4
  c.weight_decay_on_bn_and_bias = True
  c.label_smoothing = 0.0
  c.seed = 0
  # Bookkeeping.
  c.log_every_steps = 100
  c.tensorboard = True            # also write TensorBoard events (needs TensorFlow)
  c.eval_every_steps = 0          # 0: only at the end
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  c.compilation_cache_dir = "auto"  # JAX's persistent cache: "auto" (~/.cache), a path, or ""
  return c


def parse_args(arg: str | None, vocabulary: dict[str, tuple[str, ...]],
               defaults: dict[str, str]) -> dict[str, Any]:
  """Splits 'cifar10,cifar_resnet20,ms_sar,local' into {'dataset': ..., 'local': True}.

  Each comma-separated word must belong to exactly one vocabulary group (a key of
  ``vocabulary``) or be a flag listed under the group 'flags'; groups not named take
  ``defaults``.
  """
  out: dict[str, Any] = dict(defaults)
  flags = set(vocabulary.get("flags", ()))
  out.update({f: False for f in flags})
  for word in [w.strip() for w in (arg or "").split(",") if w.strip()]:
    if word in flags:
      out[word] = True
      continue
    groups = [g for g, words in vocabulary.items() if g != "flags" and word in words]
    if not groups:
      known = ", ".join(w for ws in vocabulary.values() for w in ws)
      raise ConfigError(f"unknown config argument {word!r}; use comma-separated words from: "
                        f"{known}.")
    out[groups[0]] = word
  return out


def _simple(value):
  if isinstance(value, list):
    value = tuple(value)
  return value if isinstance(value, _SIMPLE) else None


def default_model_kwargs(model: str) -> dict[str, Any]:
  """The network's own settable fields with their values, so flags can override them."""
  ctor = models.get_spec(model).constructor
  values = {f.name: f.default for f in dataclasses.fields(ctor.func)
            if f.default is not dataclasses.MISSING}
  values.update(ctor.keywords)
  keep = set(models.model_arguments(model)) - {"dtype"}
  return {k: _simple(v) for k, v in values.items() if k in keep and _simple(v) is not None}


def default_recalibration_kwargs(model: str, name: str) -> dict[str, Any]:
  """The recalibration module's arguments with the defaults ``get_model`` would use."""
  cls = recalibration.get_recalibration(name)
  if cls is None:
    return {}
  values = {f.name: f.default for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING}
  values.update(models.get_spec(model).recalibration_defaults.get(name, {}))
  keep = set(recalibration.recalibration_arguments(name))
  return {k: _simple(v) for k, v in values.items() if k in keep and _simple(v) is not None}


def set_model(config: ml_collections.ConfigDict, model: str, recal: str) -> None:
  """Sets model + recalibration and exposes their arguments as overridable config keys."""
  config.model = model
  config.recalibration = recal
  config.model_kwargs = default_model_kwargs(model)
  config.recalibration_kwargs = default_recalibration_kwargs(model, recal)


def image_size(config) -> int:
  """``config.image_size``, or the network's design size (32 CIFAR, 224 ImageNet)."""
  return int(config.image_size or models.input_size(config.model))


def data_dir(config) -> str | None:
  """``config.data_dir`` if set, else $TFDS_DATA_DIR, else None (TFDS's default)."""
  return config.data_dir or os.environ.get("TFDS_DATA_DIR") or None


def validate(config, device_count: int, process_count: int) -> None:
  """Checks that need no data and no compilation; raises ConfigError naming the fix."""
  models.get_spec(config.model)                     # unknown model: ConfigError listing them
  recalibration.get_recalibration(config.recalibration)  # unknown recalibration: likewise
  datasets.get(config.dataset)
  if config.implementation not in backends.CHOICES:
    raise ConfigError(f"config.implementation={config.implementation!r} is unknown; use one "
                      f"of {', '.join(backends.CHOICES)}.")
  if config.lr_schedule not in SCHEDULES:
    raise ConfigError(f"config.lr_schedule={config.lr_schedule!r} is unknown; use 'step' or "
                      "'cosine'.")
  for key in ("batch_size", "eval_batch_size"):
    size = config[key] or config.batch_size
    if size <= 0:
      raise ConfigError(f"config.{key}={size} must be positive.")
    if size % device_count:
      raise ConfigError(f"config.{key}={size} is not divisible by the {device_count} devices; "
                        f"use a multiple of {device_count}, e.g. --config.{key}="
                        f"{max(device_count, size // device_count * device_count)}.")
    if size % process_count:
      raise ConfigError(f"config.{key}={size} is not divisible by the {process_count} "
                        "processes; use a multiple of the device count.")
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ConfigError(f"nothing to train: config.num_train_steps={config.num_train_steps} and "
                      f"config.num_epochs={config.num_epochs}; set one of them > 0.")
  if not config.learning_rate > 0:
    raise ConfigError(f"config.learning_rate={config.learning_rate} must be positive, e.g. "
                      "--config.learning_rate=0.1.")
  for key in ("weight_decay", "warmup_epochs"):
    if config[key] < 0:
      raise ConfigError(f"config.{key}={config[key]} must be >= 0.")
  if not 0.0 <= config.momentum < 1.0:
    raise ConfigError(f"config.momentum={config.momentum} must be in [0, 1), e.g. 0.9.")
  for key in ("eval_every_steps", "checkpoint_every_steps"):
    if config[key] < 0:
      raise ConfigError(f"config.{key}={config[key]} must be >= 0 (0: only at the end).")
  if not 0.0 <= config.label_smoothing < 1.0:
    raise ConfigError(f"config.label_smoothing={config.label_smoothing} must be in [0, 1).")
  if list(config.lr_boundaries) != sorted(config.lr_boundaries) or any(
      not 0.0 < b < 1.0 for b in config.lr_boundaries):
    raise ConfigError(f"config.lr_boundaries={tuple(config.lr_boundaries)} must be increasing "
                      "fractions in (0, 1), e.g. (0.5, 0.75).")
  if config.keep_checkpoints < 1:
    raise ConfigError(f"config.keep_checkpoints={config.keep_checkpoints} must be >= 1.")
  if config.log_every_steps < 1:
    raise ConfigError(f"config.log_every_steps={config.log_every_steps} must be >= 1.")
