"""Trains cifar_resnet20 + MS-SAR on the real CIFAR-10 copy and checks test accuracy.

The data directory comes from $MSSAR_TFDS_DATA_DIR (``.ci/run`` sets it to
``../shared/data/tfds``; a relative path is taken from the working directory, then from the
repository root). Under CI (CI=true) a missing directory is a failure, elsewhere a skip.

200 steps of batch 64 (about a quarter epoch, lr 0.1 divided by 10 at steps 100 and 150) on
8 simulated CPU devices, then evaluation on all 10,000 test images. Measured on the 2-core
development VM: 37.6% test accuracy, about 2.5 minutes. Chance is 10%.
"""

import pytest

from configs import cifar
from mssar_jax import metrics_writer, train
from tests import tiny

@pytest.mark.slow
def test_cifar10_resnet20_ms_sar_learns(tmp_path):
  config = cifar.get_config("cifar10,cifar_resnet20,ms_sar,local")
  config.data_dir = tiny.real_cifar10_dir()
  config.num_train_steps = 200
  config.eval_every_steps = 0          # evaluate once, at the end
  config.checkpoint_every_steps = 0    # checkpoint once, at the end
  config.eval_batch_size = 1000
  config.log_every_steps = 50
  config.cache = False                 # 200 x 64 images: no need to decode all 50,000
  config.shuffle_buffer = 10_000
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["eval/num_examples"] == 10_000
  assert result["eval/accuracy"] > 0.30, result   # 3x chance; measured 0.376
  records = metrics_writer.read_metrics(str(tmp_path))
  assert records[0]["train/loss"] > records[-1]["train/loss"]
