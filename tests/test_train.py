"""End-to-end ``train_and_evaluate`` on mock TFDS data with tiny models on 8 CPU devices."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mssar_jax import datasets
from mssar_jax.configs import cifar, imagenet
from mssar_jax import data as data_lib
from mssar_jax.storage import metrics as metrics_lib
from mssar_jax.train import loop, optim, state as state_lib, trained
from mssar_jax.train import step as step_lib
from mssar_jax.errors import ConfigError
from tests import tiny

N = 50  # mock examples per split; batch 16 -> 3 steps per epoch, eval batch 24 -> 2 pads


def test_cifar_run_writes_all_outputs(tmp_path, mock_tfds, tiny_cifar_config, capsys):
  assert jax.device_count() == 8
  workdir = str(tmp_path / "run")
  config = tiny_cifar_config()
  with mock_tfds(N):
    result = loop.train_and_evaluate(config, workdir)
  assert result["step"] == 6 and result["eval/num_examples"] == N
  assert 0.0 <= result["eval/accuracy"] <= 1.0 and np.isfinite(result["eval/loss"])
  records = metrics_lib.read_metrics(workdir)
  assert [r["step"] for r in records] == [2, 3, 4, 6]           # one object per logged step
  assert set(records[0]) == {"step", "train/loss", "train/accuracy", "train/learning_rate"}
  assert {"eval/accuracy", "eval/loss", "train/loss"} <= set(records[-1])
  assert records[-1]["eval/accuracy"] == result["eval/accuracy"]
  assert json.load(open(os.path.join(workdir, "config.json")))["model"] == "cifar_resnet20"
  assert any(f.startswith("events.out.tfevents")
             for f in os.listdir(os.path.join(workdir, "tensorboard")))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6"]  # keep 2
  out = capsys.readouterr().out
  assert "img/s" in out and "ETA" in out and "] 6/6 (100%)" in out
  assert "done: step 6/6" in out and "eval/accuracy" in out

  # Re-running the finished command resumes at the end and only re-evaluates.
  with mock_tfds(N):
    again = loop.train_and_evaluate(config, workdir)
  assert again["eval/accuracy"] == result["eval/accuracy"]
  assert "resuming at step 6" in capsys.readouterr().out

  # A different model in the same workdir is refused with a clear message.
  other = tiny_cifar_config(recalibration="se", recalibration_kwargs={})
  with mock_tfds(N), pytest.raises(ConfigError, match="different run.*recalibration"):
    loop.train_and_evaluate(other, workdir)


@pytest.mark.slow
def test_imagenet_sample_trains_and_evaluates_each_validation_image_once(tmp_path):
  """ResNet-50 (local variant) on the real ILSVRC2012 sample: original training JPEGs (some
  greyscale, with ICC/EXIF segments) through the fused decode-and-crop, and all 500
  validation images evaluated exactly once, top-1 and top-5."""
  config = imagenet.get_config("resnet50,none,local")  # the data path is the point here
  config.data_dir = tiny.real_data_dir("imagenet2012")
  config.image_size = 32                                # crops of the real JPEGs, resized
  config.batch_size, config.eval_batch_size = 16, 64   # 500 = 7 x 64 + 52 masked pads
  config.num_train_steps, config.checkpoint_every_steps = 2, 0
  result = loop.train_and_evaluate(config, str(tmp_path))
  assert result["step"] == 2 and result["eval/num_examples"] == 500
  assert 0.0 <= result["eval/accuracy"] <= result["eval/top5_accuracy"] <= 1.0
  assert np.isfinite(result["eval/loss"])
  assert "eval/top5_accuracy" in metrics_lib.read_metrics(str(tmp_path))[-1]


def test_bf16_and_f32_logits_agree_after_a_few_steps(tmp_path, mock_tfds, tiny_cifar_config):
  """The same trained parameters evaluated in bfloat16 and in float32: the logits agree to
  within 5% of their range (bfloat16 keeps 8 bits of mantissa through 8 layers)."""
  config = tiny_cifar_config(num_train_steps=4, eval_every_steps=0)
  config.model_kwargs.width = 16
  with mock_tfds(N):
    loop.train_and_evaluate(config, str(tmp_path))
  run = trained.load(str(tmp_path))
  images = step_lib.normalise(jnp.asarray(np.random.default_rng(0).integers(
      0, 256, (16, 32, 32, 3)), jnp.uint8), datasets.get("cifar10"))
  f32 = run.model.apply(run.variables, images, train=False)
  config.half_precision = True
  bf16 = state_lib.create_model(config, 10).apply(run.variables, images, train=False)
  assert bf16.dtype == f32.dtype == jnp.float32          # logits in float32 either way
  span = float(jnp.max(f32) - jnp.min(f32))
  assert span > 0 and float(jnp.max(jnp.abs(bf16 - f32))) <= 0.05 * span
  assert float(jnp.mean(jnp.argmax(bf16, -1) == jnp.argmax(f32, -1))) >= 0.9


@pytest.mark.slow
def test_a_short_bf16_run_on_cpu_learns(tmp_path):
  """``bf16`` on real CIFAR-10: the loss falls and test accuracy clears chance."""
  config = cifar.get_config("cifar10,cifar_resnet20,ms_sar,local,bf16")
  assert config.half_precision
  config.data_dir = tiny.real_cifar10_dir()
  config.model_kwargs.depth, config.model_kwargs.width = 8, 8
  config.train_split, config.eval_split = "train[:2048]", "test[:512]"
  config.batch_size, config.eval_batch_size = 64, 256
  config.num_train_steps, config.log_every_steps = 60, 10
  config.eval_every_steps = config.checkpoint_every_steps = 0
  config.shuffle_buffer = 2048
  result = loop.train_and_evaluate(config, str(tmp_path))
  losses = [r["train/loss"] for r in metrics_lib.read_metrics(str(tmp_path)) if "train/loss" in r]
  assert losses[-1] < losses[0] - 0.2, losses
  assert result["eval/accuracy"] > 0.2, result


def _info(config):
  builder = data_lib.get_builder(config)
  return data_lib.get_info(config, builder, local_batch=config.batch_size,
                                 local_eval_batch=config.eval_batch_size, process_index=0,
                                 process_count=1)


@pytest.mark.parametrize("eval_batch", [8, 24, 56])
def test_eval_counts_every_example_once(mock_tfds, tiny_cifar_config, eval_batch):
  """Padded + masked eval == one unpadded pass over all examples, for any batch size."""
  config = tiny_cifar_config(eval_batch_size=eval_batch)
  with mock_tfds(N):
    builder = data_lib.get_builder(config)
    info = _info(config)
    data = data_lib.eval_dataset(config, builder, info, local_batch=eval_batch,
                                       process_index=0, process_count=1)
    model = state_lib.create_model(config, 10)
    tx = optim.make_optimizer(config, lambda _: 0.0)
    state = state_lib.init_state(jax.random.key(1), model, tx, 32)
    mesh = step_lib.make_mesh()
    data_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    eval_fn = jax.jit(functools.partial(step_lib.eval_step, model=model,
                                        stats=datasets.get("cifar10")))
    got = loop.evaluate(eval_fn, state, data, data_sharding, top5=True)
    batches = list(data.as_numpy_iterator())
  images = np.concatenate([b["image"] for b in batches])[:N]
  labels = np.concatenate([b["label"] for b in batches])[:N]
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  normalised = step_lib.normalise(jnp.asarray(images), datasets.get("cifar10"))
  logits = np.asarray(model.apply(variables, normalised, train=False))
  assert got["eval/num_examples"] == N
  assert got["eval/accuracy"] == np.mean(logits.argmax(-1) == labels)
  top5 = np.argsort(-logits, -1)[:, :5]
  assert got["eval/top5_accuracy"] == np.mean((top5 == labels[:, None]).any(-1))
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                                keepdims=True)) \
      - logits.max(-1, keepdims=True)
  np.testing.assert_allclose(got["eval/loss"], -logp[np.arange(N), labels].mean(), rtol=1e-4)
