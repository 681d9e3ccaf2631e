"""The training command's start: cluster detection for jax.distributed, and the run's first
lines (backend and devices; what a user must know about them)."""

import os
import socket
import subprocess
import sys

from mssar_jax import cpu_process
from mssar_jax.train import loop
from tests import tiny

_PROBE = """
from absl import app
from mssar_jax.cli import train
import jax
try:
  print(train.initialize_distributed(required=False), jax.distributed.is_initialized())
except app.UsageError as e:
  print("error:", e)
"""


def _probe(**env):
  clean = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))}
  out = subprocess.run([sys.executable, "-c", _PROBE], env={**clean, **env}, cwd=tiny.ROOT,
                       capture_output=True, text=True, timeout=120, check=True)
  return out.stdout.strip().splitlines()[-1]


def test_distributed_is_initialised_where_a_cluster_is_detected():
  assert _probe() == "single process (no cluster detected) False"
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  # The JAX_COORDINATOR_ADDRESS family (what SLURM / a launcher exports): no --multihost.
  assert _probe(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="1",
                JAX_PROCESS_ID="0") == "process 0 of 1 True"
  # Half a description is a one-line error, not a silent single-process run.
  half = _probe(JAX_COORDINATOR_ADDRESS=f"localhost:{port}")
  assert half.startswith("error: jax.distributed.initialize() failed") and "JAX_NUM_PROCESSES" in half


def test_first_lines_name_the_backend_and_warn_about_an_idle_plugin(monkeypatch):
  config = tiny.tiny_cifar_config()
  lines = loop.header(config)
  assert lines[0].startswith("JAX ") and "on cpu: 8 cpu devices in 1 process" in lines[0]
  assert "WARNING" not in lines[0] and len(lines) == 1
  monkeypatch.setattr(cpu_process, "accelerator_plugins", lambda: ["jax_cuda12_plugin"])
  lines = loop.header(config)
  assert len(lines) == 2 and lines[1].startswith("WARNING: jax_cuda12_plugin installed but JAX "
                                                 "runs on the CPU")


def test_several_processes_without_preemption_sync_say_so_in_the_first_line(monkeypatch):
  monkeypatch.setattr(loop.jax, "process_count", lambda: 2)
  monkeypatch.setattr(loop.preemption, "synchronised", lambda: False)
  first = loop.header(tiny.tiny_cifar_config())[0]
  assert first.startswith("JAX ") and "in 2 processes; WARNING: preemption cannot be " \
      "synchronised" in first
