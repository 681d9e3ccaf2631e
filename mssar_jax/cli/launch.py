"""Console-script entry points: the process set-up first, then the command's module.

``cpu_process.prepare()`` may re-run the process (glibc reads its malloc tunables at start), so
it runs before the command's module imports JAX and TensorFlow.
"""

import runpy

from mssar_jax import cpu_process


def _run(module: str) -> None:
  cpu_process.prepare()
  runpy.run_module(module, run_name="__main__", alter_sys=True)


def train():
  _run("mssar_jax.cli.train")


def visualize():
  _run("mssar_jax.cli.visualize")


def plot():
  _run("mssar_jax.cli.plot")


def summary():
  _run("mssar_jax.cli.summary")
