r"""Train and evaluate a config (``mssar-train``, ``python -m mssar_jax.cli.train``, or the
repository's ``train.py``):

    mssar-train --config configs/cifar.py:cifar10,cifar_resnet20,ms_sar --workdir runs/r20
    mssar-train --config configs/imagenet.py:resnet50,ms_sar --workdir gs://bucket/r50

Re-running the same command with the same --workdir resumes from its newest checkpoint.
SIGTERM / Ctrl-C saves a checkpoint of the current step and exits with status 0. A bad
config or a diverged run prints one line and exits with status 1.

Several hosts: run the same command on every host. Where JAX detects a cluster (a multi-host
TPU slice, SLURM, Open MPI, Kubernetes, or $JAX_COORDINATOR_ADDRESS with $JAX_NUM_PROCESSES and
$JAX_PROCESS_ID) ``jax.distributed.initialize()`` is called first, so hosts agree on
preemption and checkpoints; ``--multihost`` makes a failure to do so an error.
On a CPU-only install ``mssar-train`` and ``train.py`` first set the process up for XLA:CPU
(``mssar_jax.cpu_process``, through ``mssar_jax.cli.launch``).
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from mssar_jax.errors import ConfigError
from mssar_jax.train import loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment file and arguments, e.g. "
    "configs/cifar.py:cifar10,cifar_resnet20,ms_sar.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints "
                               "and metrics.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Require jax.distributed.initialize() to succeed (else it is tried "
    "where JAX can detect a cluster).")


_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize_distributed(required: bool) -> str:
  """Calls jax.distributed.initialize() where JAX detects a cluster or the $JAX_COORDINATOR_*
  variables describe one; returns what happened. A half-described cluster is an error."""
  if jax.distributed.is_initialized():
    return "already initialised"
  kwargs = {}
  if os.environ.get("JAX_NUM_PROCESSES"):  # jax reads only the address from the environment
    kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
  if os.environ.get("JAX_PROCESS_ID"):
    kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
  try:
    jax.distributed.initialize(**kwargs)
  except ValueError as e:  # no cluster detected, or only part of one described
    if required or any(os.environ.get(name) for name in _ENV):
      raise app.UsageError(f"jax.distributed.initialize() failed ({e}); set "
                           f"{', '.join('$' + n for n in _ENV)} on every process, or run on a "
                           "TPU slice or under SLURM.") from e
    return "single process (no cluster detected)"
  return f"process {jax.process_index()} of {jax.process_count()}"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # keep the console to the progress lines
  initialize_distributed(_MULTIHOST.value)
  try:
    loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except ConfigError as e:  # one line naming the problem and the fix, no traceback
    sys.exit(f"train: config error: {e}")
  except FloatingPointError as e:
    sys.exit(f"train: training diverged: {e}")


def run():
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)


if __name__ == "__main__":
  run()
