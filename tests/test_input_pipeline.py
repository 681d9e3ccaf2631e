"""tf.data pipelines on mock TFDS data: shapes, uint8 images, exact resume, eval padding,
missing data."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mssar_jax.configs import cifar, imagenet
from mssar_jax import data as ip
from mssar_jax.errors import ConfigError

N = 50  # mock examples per split


def _setup(config, batch=8, eval_batch=16):
  builder = ip.get_builder(config)
  info = ip.get_info(config, builder, local_batch=batch, local_eval_batch=eval_batch,
                     process_index=0, process_count=1)
  return builder, info


def _cifar(**overrides):
  c = cifar.get_config("cifar10,cifar_resnet20,none")
  c.shuffle_buffer = 64
  for k, v in overrides.items():
    c[k] = v
  return c


def test_cifar_sizes_and_eval_images_as_stored(mock_tfds):
  c = _cifar()
  with mock_tfds(N):
    builder, info = _setup(c)
    assert (info.num_classes, info.image_size, info.train_examples) == (10, 32, N)
    assert (info.steps_per_epoch, info.eval_examples, info.eval_steps) == (N // 8, N, 4)
    raw = np.stack([e["image"] for e in tfds.as_numpy(builder.as_dataset(split="test"))])
    batches = list(ip.eval_dataset(c, builder, info, local_batch=16, process_index=0,
                                   process_count=1).as_numpy_iterator())
  images = np.concatenate([b["image"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  assert images.shape == (64, 32, 32, 3) and mask.sum() == N and mask[:N].all()
  assert images.dtype == np.uint8  # normalised on the device (train/step.py)
  np.testing.assert_array_equal(images[:N], raw)
  assert not images[N:].any()


def test_cifar_train_batches_are_augmented_uint8(mock_tfds):
  c = _cifar()
  with mock_tfds(N):
    builder, info = _setup(c)
    batch = next(ip.TrainData(c, builder, info, local_batch=8, process_index=0,
                              process_count=1).iterate(0))
  assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.uint8
  assert batch["label"].dtype == np.int32 and batch["label"].shape == (8,)
  assert (batch["image"] == 0).all(-1).any()  # zero padding shows up after a shifted crop


def _stream(c, start, count):
  with_mock = tfds.testing.mock_data(num_examples=N, policy=tfds.testing.MockPolicy.USE_CODE)
  with with_mock:
    builder, info = _setup(c)
    data = ip.TrainData(c, builder, info, local_batch=8, process_index=0, process_count=1)
    it = data.iterate(start)
    return [next(it) for _ in range(count)], info


@pytest.mark.parametrize("cache", [True, False])
def test_train_stream_resumes_exactly_mid_epoch(cache):
  c = _cifar(cache=cache)
  straight, info = _stream(c, 0, 15)
  spe = info.steps_per_epoch  # 6 -> step 8 is batch 2 of epoch 1
  resumed, _ = _stream(c, 8, 7)
  for a, b in zip(straight[8:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  # Epochs are different permutations with different augmentations.
  assert not np.array_equal(straight[0]["image"], straight[spe]["image"])
  again, _ = _stream(c, 0, 2)
  np.testing.assert_array_equal(again[1]["image"], straight[1]["image"])
  other, _ = _stream(_cifar(cache=cache, seed=1), 0, 1)
  assert not np.array_equal(other[0]["image"], straight[0]["image"])


def test_imagenet_shapes(mock_tfds):
  c = imagenet.get_config("resnet50,none,local")
  c.image_size = 64
  with mock_tfds(12):
    builder, info = _setup(c, batch=4, eval_batch=8)
    assert info.num_classes == 1000 and info.eval_steps == 2
    train = next(ip.TrainData(c, builder, info, local_batch=4, process_index=0,
                              process_count=1).iterate(0))
    evals = list(ip.eval_dataset(c, builder, info, local_batch=8, process_index=0,
                                 process_count=1).as_numpy_iterator())
  assert train["image"].shape == (4, 64, 64, 3)
  assert [b["image"].shape for b in evals] == [(8, 64, 64, 3)] * 2
  assert sum(b["mask"].sum() for b in evals) == 12
  assert train["image"].dtype == np.uint8 and train["image"].std() > 1


def test_missing_dataset_is_one_clear_config_error(tmp_path):
  c = _cifar(data_dir=str(tmp_path), download=False)
  with pytest.raises(ConfigError, match=f"cifar10.*not found in {tmp_path}.*tfds build.*"
                     "download=True") as e:
    ip.get_builder(c)
  assert "\n" not in str(e.value)
  # Offline, the download the CIFAR configs allow fails with the same advice, in one line.
  c = _cifar(data_dir=str(tmp_path))
  assert c.download
  with pytest.raises(ConfigError, match=f"cifar10.*not found in {tmp_path} and TFDS could not "
                     "download it.*tfds build") as e:
    ip.get_builder(c)
  assert "\n" not in str(e.value)
  c = imagenet.get_config("resnet50,ms_sar")
  c.data_dir = str(tmp_path)
  with pytest.raises(ConfigError, match="downloads/manual"):
    ip.get_builder(c)


def test_batch_larger_than_data_is_config_error(mock_tfds):
  with mock_tfds(10):
    with pytest.raises(ConfigError, match="batch"):
      _setup(_cifar(), batch=16)
