"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# ---- Trainer fixtures (tests/test_train*.py, test_input_pipeline.py, test_configs.py). ----
import pathlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))  # `configs/` and `train.py` live at the repository root


@pytest.fixture
def mock_tfds():
  """Offline fake TFDS data (random images built from the dataset's code, no metadata)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  def make(num_examples):
    return tfds.testing.mock_data(num_examples=num_examples,
                                  policy=tfds.testing.MockPolicy.USE_CODE)
  return make


@pytest.fixture
def tiny_cifar_config():
  """cifar_resnet20 + ms_sar shrunk to depth 8, width 4 on mock CIFAR-10: seconds per run."""
  from configs import cifar  # pylint: disable=import-outside-toplevel

  def make(**overrides):
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
  return make
