"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# JAX's persistent compilation cache: the trainer tests build the same tiny programs many times
# (in this process and in subprocesses, which inherit the variable); later builds load the
# executable instead of compiling it again. Same executable, same results.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"mssar_jax_test_cache_{os.getuid()}"))
# Every program, however quick to build: a subprocess run's ~200 small eager-init programs
# would otherwise be compiled again in each process (JAX caches only those taking >= 1 s).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# The tests' networks are tiny and run a few steps: XLA's compile time dominates, so skip most
# of its optimisations (the same semantics; half the time of most unit-test files, measured
# file by file). Subprocesses inherit it; tests/test_real_cifar10.py (a long run) and
# tests/test_implementations.py (the programs training runs) turn the optimisations back on.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")

# ---- Trainer fixtures (tests/test_train*.py, test_data_lib.py, test_configs.py). ----
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
  """``tests/tiny.py``'s config factory: tiny_cifar_config(**overrides) -> ConfigDict."""
  from tests import tiny  # pylint: disable=import-outside-toplevel
  return tiny.tiny_cifar_config


def pytest_collection_modifyitems(config, items):
  """The slow tests first (a stable sort, the same in every xdist worker): the two workers
  start on the long runs and finish on the short tests, instead of one worker ending alone
  on a long run."""
  del config
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
