"""The tiny CIFAR config shared by in-process tests (conftest fixture) and subprocess runs."""

import os
import pathlib

import pytest

from mssar_jax.configs import cifar

ROOT = pathlib.Path(__file__).resolve().parents[1]

MOCK_EXAMPLES = 50  # mock TFDS examples per split used with the tiny config


def tiny_cifar_config(**overrides):
  """cifar_resnet20 + ms_sar shrunk to depth 8, width 4 on mock CIFAR-10: seconds per run."""
  c = cifar.get_config("cifar10,cifar_resnet20,ms_sar,local")
  c.model_kwargs.depth = 8
  c.model_kwargs.width = 4
  c.data_dir = ""
  c.batch_size = 16
  c.eval_batch_size = 24
  c.num_train_steps = 6
  c.log_every_steps = 2
  c.eval_every_steps = 3
  c.checkpoint_every_steps = 2
  c.keep_checkpoints = 2
  c.shuffle_buffer = 64
  c.async_checkpointing = False
  for key, value in overrides.items():
    c[key] = value
  return c


def real_cifar10_dir() -> str:
  """The TFDS data_dir of the real CIFAR-10 copy (``real_data_dir``)."""
  return real_data_dir("cifar10")


def real_data_dir(dataset: str) -> str:
  """The TFDS data_dir holding the real copy of ``dataset`` ($MSSAR_TFDS_DATA_DIR; ``.ci/run``
  sets it to ``../shared/data/tfds``; a relative path is tried from the working directory,
  then from the repository root). Under CI (CI=true) a missing copy fails the test, elsewhere
  it skips."""
  value = os.environ.get("MSSAR_TFDS_DATA_DIR", "")
  candidates = [pathlib.Path(value), ROOT / value] if value else []
  for path in candidates:
    if (path / dataset).is_dir():
      return str(path.resolve())
  message = (f"real {dataset} not found (MSSAR_TFDS_DATA_DIR={value!r}); set it to the TFDS "
             f"data_dir holding {dataset}/, e.g. ../shared/data/tfds")
  if os.environ.get("CI", "").lower() == "true":
    pytest.fail(message)
  pytest.skip(message)
