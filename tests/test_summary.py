"""The summary tool: parameter and FLOP overheads, as a markdown table."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from mssar_jax.cli import summary
from mssar_jax.models import get_model


def _summary(*args):
  return subprocess.run([sys.executable, "-m", "mssar_jax.cli.summary", *args],
                        capture_output=True, text=True, check=False)


def test_summary_table_for_cifar_resnet20():
  done = _summary("--model", "cifar_resnet20", "--recalibration", "none,se,ms_sar",
                  "--config.scales=(4,8)")
  assert done.returncode == 0, done.stderr[-2000:]
  lines = done.stdout.strip().splitlines()
  assert lines[0].startswith("| model | recalibration | params |") and len(lines) == 5
  assert lines[2].startswith("| cifar_resnet20 | none | 269,722 | +0.00% |")
  rows = summary.summarize(["cifar_resnet20"])
  none, se, ms = rows
  scales_4_8 = get_model("cifar_resnet20", num_classes=10, recalibration="ms_sar",
                         scales=(4, 8))
  counted = jax.eval_shape(scales_4_8.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert f"| ms_sar | {sum(int(np.prod(a.shape)) for a in jax.tree.leaves(counted['params'])):,}" in lines[4]
  assert none.flops < se.flops < ms.flops and none.params < se.params < ms.params
  assert 0 < ms.flops_overhead < 0.05 and 0 < ms.params_overhead < 0.05
  model = get_model("cifar_resnet20", num_classes=10, recalibration="ms_sar")
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert ms.params == sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables["params"]))


def test_flops_count_every_block():
  # ResNet-56 has 27 basic blocks, ResNet-20 has 9: a count that saw a scanned stage once
  # would give nearly equal numbers. The 3x3 stem (3 -> 16 channels, 32x32, zero padding) is
  # counted at 2 FLOPs per multiply-add over valid taps and is a small part of the total.
  r20, r56 = summary.measure("cifar_resnet20"), summary.measure("cifar_resnet56")
  assert 2.9 < r56.flops / r20.flops < 3.1
  valid_taps = sum(min(i + 1, 31) - max(i - 1, 0) + 1 for i in range(32)) ** 2
  stem = 2 * valid_taps * 3 * 16
  assert stem < 0.02 * r20.flops


def test_summary_reports_bad_arguments_in_one_line():
  done = _summary("--model", "resnet18")
  err = done.stderr.strip().splitlines()[-1]
  assert done.returncode == 1 and err.startswith("summary: unknown model 'resnet18'")
