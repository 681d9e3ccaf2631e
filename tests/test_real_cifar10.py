"""Trains a CIFAR ResNet + MS-SAR on the real CIFAR-10 copy through ``train.py`` and checks
test accuracy.

The data directory comes from $MSSAR_TFDS_DATA_DIR (``.ci/run`` sets it to
``../shared/data/tfds``; see ``tests/tiny.real_cifar10_dir``). Under CI (CI=true) a missing
directory is a failure, elsewhere a skip.

The README's main command (``local`` variant, the network shrunk to ResNet-8: the data and the
trainer are the point) as a subprocess on one CPU device (the fastest layout on this 2-core
machine): 200 steps of batch 64 (about a quarter epoch, lr 0.1 divided
by 10 at steps 100 and 150), then evaluation on all 10,000 test images. Chance is 10%.
"""

import json
import os
import subprocess
import sys

import pytest

from mssar_jax.storage import metrics as metrics_lib
from tests import tiny


@pytest.mark.slow
def test_main_command_learns_on_real_cifar10(tmp_path):
  workdir = tmp_path / "run"
  # Optimised XLA (conftest turns optimisations off for the short tests): 200 steps and
  # 10,000 test images run twice as fast with them.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_DISABLE_MOST_OPTIMIZATIONS="false")
  proc = subprocess.run(
      [sys.executable, "train.py", "--config", "configs/cifar.py:cifar10,cifar_resnet20,ms_sar,local",
       "--workdir", str(workdir), f"--config.data_dir={tiny.real_cifar10_dir()}",
       "--config.num_train_steps=200", "--config.eval_every_steps=0",
       "--config.checkpoint_every_steps=0", "--config.eval_batch_size=1000",
       "--config.log_every_steps=50", "--config.model_kwargs.depth=8",
       "--config.cache=False",          # 200 x 64 images: no need to decode all 50,000
       "--config.shuffle_buffer=10000"],
      cwd=tiny.ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith("JAX ") and "1 cpu device in 1 process" in proc.stdout
  # One CPU device: the CPU implementation with oneDNN convolutions (CI installs the extra).
  assert "implementation: cpu (oneDNN convolutions" in proc.stdout, proc.stdout
  final = [line for line in proc.stdout.splitlines() if line.startswith("done: step 200/200")]
  assert final and "eval/accuracy" in final[0], proc.stdout
  records = metrics_lib.read_metrics(str(workdir))
  last = records[-1]
  assert last["step"] == 200 and last["eval/num_examples"] == 10_000
  print(f"real CIFAR-10, ResNet-8 + ms_sar, 200 x 64 steps: "
        f"test accuracy {last['eval/accuracy']:.4f}")
  assert last["eval/accuracy"] > 0.30, last   # 3x chance
  assert records[0]["train/loss"] > last["train/loss"]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["200"]
  assert json.loads((workdir / "config.json").read_text())["recalibration"] == "ms_sar"
