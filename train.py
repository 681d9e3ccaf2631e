r"""Command line entry point; the logic lives in ``mssar_jax.train.train_and_evaluate``.

    python train.py --config configs/cifar.py:cifar10,cifar_resnet20,ms_sar --workdir /tmp/r20
    python train.py --config configs/cifar.py:cifar10,cifar_resnet20,ms_sar,local \
        --workdir /tmp/r20_local --config.batch_size=256

Re-running the same command with the same --workdir resumes from its newest checkpoint.
SIGTERM / Ctrl-C saves a checkpoint of the current step and exits with status 0. A bad
config or a diverged run prints one line and exits with status 1.
On a multi-host TPU slice, run the same command on every host with --multihost.
On Linux (CPU-only JAX) it re-runs itself once with glibc malloc tunables that keep XLA's step
buffers allocated between steps (``mssar_jax.malloc_tuning``; MSSAR_MALLOC_TUNING=0 turns that
off). On CPU it starts XLA with oneDNN convolutions (``mssar_jax.xla_flags``; $XLA_FLAGS overrides:
--xla_cpu_experimental_onednn_custom_call=false turns them off).
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment file and arguments, e.g. configs/cifar.py:cifar10,cifar_resnet20,ms_sar.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() first (multi-host TPU / GPU).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # keep the console to the progress lines
  from mssar_jax import xla_flags  # pylint: disable=import-outside-toplevel
  xla_flags.add_xla_flags(xla_flags.FAST_CPU_FLAGS)  # before JAX's CPU backend exists
  import jax  # pylint: disable=import-outside-toplevel
  if _MULTIHOST.value:
    jax.distributed.initialize()
  from mssar_jax import train  # pylint: disable=import-outside-toplevel
  from mssar_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  logging.info("JAX devices: %s", jax.devices())
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except ConfigError as e:  # one line naming the problem and the fix, no traceback
    sys.exit(f"train.py: config error: {e}")
  except FloatingPointError as e:
    sys.exit(f"train.py: training diverged: {e}")


if __name__ == "__main__":
  from mssar_jax import malloc_tuning  # pylint: disable=g-import-not-at-top
  malloc_tuning.reexec_with_tuned_malloc()  # XLA's step buffers reused (Linux, glibc)
  app.run(main)
