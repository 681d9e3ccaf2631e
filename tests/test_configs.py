"""Experiment configs: every combination builds a valid model; CLI overrides; errors."""

import os
import subprocess
import sys

import jax
import pytest

from mssar_jax.configs import cifar, imagenet
from mssar_jax import config_lib
from mssar_jax.train import loop, state as state_lib
from mssar_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_MODELS = cifar._VOCABULARY["model"]
RECALS = ("none", "se", "ms_sar")


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
@pytest.mark.parametrize("model", CIFAR_MODELS)
@pytest.mark.parametrize("recal", RECALS)
def test_every_cifar_experiment_builds(dataset, model, recal):
  c = cifar.get_config(f"{dataset},{model},{recal}")
  config_lib.validate(c, device_count=8, process_count=1)
  assert (c.dataset, c.model, c.recalibration) == (dataset, model, recal)
  densenet = model.startswith("cifar_densenet")
  assert (c.batch_size, c.num_epochs, c.nesterov) == ((64, 300, True) if densenet
                                                      else (128, 164, False))
  assert (c.learning_rate, c.momentum, c.weight_decay) == (0.1, 0.9, 1e-4)
  assert tuple(c.lr_boundaries) == (0.5, 0.75)
  state_lib.create_model(c, num_classes=100 if dataset == "cifar100" else 10)


@pytest.mark.parametrize("model", ["resnet50", "resnet101", "densenet121"])
@pytest.mark.parametrize("recal", RECALS)
@pytest.mark.parametrize("schedule", ["step", "cosine"])
def test_every_imagenet_experiment_builds(model, recal, schedule):
  c = imagenet.get_config(f"{model},{recal},{schedule}")
  config_lib.validate(c, device_count=8, process_count=1)
  assert (c.batch_size, c.num_epochs, c.learning_rate, c.lr_schedule) == (256, 90, 0.1,
                                                                          schedule)
  assert c.warmup_epochs > 0 and c.image_size == 224
  state_lib.create_model(c, num_classes=1000)


def test_recalibration_arguments_are_overridable_keys():
  c = cifar.get_config("cifar10,cifar_resnet56,ms_sar")
  assert {"reduction", "scales", "kernel_size", "weighting"} <= set(c.recalibration_kwargs)
  assert imagenet.get_config("resnet50,ms_sar").recalibration_kwargs.scales == (2, 4)
  assert not cifar.get_config("cifar10,cifar_resnet20,none").recalibration_kwargs


def test_bad_config_words_and_values_are_config_errors():
  with pytest.raises(ConfigError, match="unknown config argument 'resnet21'"):
    cifar.get_config("cifar10,resnet21")
  c = cifar.get_config("cifar10,cifar_resnet20,none")
  c.batch_size = 100
  with pytest.raises(ConfigError, match="not divisible by the 8 devices.*batch_size=96"):
    config_lib.validate(c, device_count=8, process_count=1)
  c = cifar.get_config("cifar10,cifar_resnet20,none")
  c.lr_schedule = "linear"
  with pytest.raises(ConfigError, match="lr_schedule"):
    config_lib.validate(c, device_count=8, process_count=1)


def test_train_and_evaluate_rejects_bad_config_before_touching_workdir(tmp_path, mock_tfds):
  workdir = tmp_path / "run"
  c = cifar.get_config("cifar10,cifar_resnet20,ms_sar,local")
  c.batch_size = 12
  with pytest.raises(ConfigError, match="divisible"):
    loop.train_and_evaluate(c, str(workdir))
  c = cifar.get_config("cifar10,cifar_resnet20,ms_sar,local")
  c.image_size = 16
  c.recalibration_kwargs.scales = (2, 8)  # 8 > the 4x4 last stage
  with mock_tfds(20), pytest.raises(ConfigError):
    loop.train_and_evaluate(c, str(workdir))
  assert not workdir.exists()
  assert jax.device_count() == 8


def test_entry_point_applies_overrides_and_reports_config_error(tmp_path):
  """`python train.py --config file.py:args --config.key=value` reaches train_and_evaluate."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "train.py", "--config", "configs/cifar.py:cifar10,cifar_resnet20,se",
       "--config.batch_size=60", "--workdir", str(tmp_path / "w")],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last == ("train: config error: config.batch_size=60 is not divisible by the 8 "
                  "devices; use a multiple of 8, e.g. --config.batch_size=56.")
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "w").exists()
