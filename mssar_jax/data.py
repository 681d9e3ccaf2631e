"""TFDS + tf.data input for CIFAR-10/100 and ImageNet: seeded, resumable, multi-process.

Preprocessing (images leave tf.data as uint8; the train step normalises them on the device):
  CIFAR train:     zero-pad 4 -> random 32x32 crop -> random horizontal flip
  CIFAR eval:      as stored
  ImageNet train:  fused JPEG decode of a random-resized crop (area 8%-100%, aspect 3/4-4/3,
                   Szegedy et al. 2015) -> resize to S x S -> random flip
  ImageNet eval:   fused JPEG decode of the central crop of side 0.875 x the shorter side
                   -> resize to S x S (the usual 256 -> 224 centre crop)
(images not of size S = config.image_size are resized to it; resized images are rounded back
to uint8).

Data order (exact resume, and the same global batches for any number of processes). One
tf.data pipeline serves the whole run: a stream of epochs, each a seeded shuffle (seed
``e_seed``, a stateless hash of (config.seed, epoch) computed in the graph) of the split, cut to
``steps_per_epoch`` global batches; example i of the epoch is augmented with the stateless seed
(e_seed, i). Batch b of epoch e is thus a pure function of (seed, e, b); training step t reads
batch t mod steps_per_epoch of epoch t div steps_per_epoch. A run resumed at step t starts the
stream at epoch e and skips the examples of its first b batches (before they are decoded), so
it sees exactly the batches an uninterrupted run would have seen. Which process reads what:

* ``shuffle_files=False`` (CIFAR): every process reads the whole split in file order and the
  same shuffle; process p of P keeps rows [p L, (p + 1) L) of each global batch (L = global
  batch / P). The global batches, hence the training, are the same for 1 or P processes.
* ``shuffle_files=True`` (ImageNet, where reading everything on every host would multiply the
  I/O): process p reads ``tfds.even_splits(split, P)[p]`` (remainder dropped, so all processes
  have the same number of steps), its files in one seeded order and its examples shuffled by
  e_seed in a ``shuffle_buffer`` window. The data are the same in distribution, not in order,
  for a different process count.

tf.data runs on a private thread pool of the host's cores with one thread per op (big_vision's
options), so the input pipeline does not compete with itself.

Eval. Each process pads its split with masked zero images to ``eval_steps * local_batch``
examples, where eval_steps is the same on every process (its largest split decides); metrics
are sum(x * mask) / sum(mask), so every example counts exactly once for any batch size and
device count.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Iterator

from jax.experimental import multihost_utils
import numpy as np
import tensorflow_datasets as tfds

try:
  import tensorflow as tf
except ImportError as e:  # the platform extras install it; Colab and accelerator images have it
  raise ImportError("the input pipeline needs TensorFlow (tf.data): pip install "
                    "'mssar-jax[tf]', or tensorflow") from e

from mssar_jax import datasets
from mssar_jax import config_lib
from mssar_jax.errors import ConfigError

_IMAGENET_HELP = (
    "ImageNet cannot be downloaded automatically: put ILSVRC2012_img_train.tar and "
    "ILSVRC2012_img_val.tar in <data_dir>/downloads/manual/ and run "
    "`tfds build imagenet2012 --data_dir <data_dir>` once, then pass --config.data_dir or set "
    "TFDS_DATA_DIR.")


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """Sizes of this process's share of the data."""
  num_classes: int
  image_size: int
  train_examples: int     # train examples in the split this process reads
  steps_per_epoch: int
  eval_examples: int      # all eval examples over all processes
  eval_steps: int         # eval batches per process (equal on all processes)


def is_imagenet(config) -> bool:
  return config.dataset.startswith("imagenet")


def _open(config, data_dir):
  """The builder if its train split can be read, else (None, TFDS's first sentence why)."""
  try:
    builder = tfds.builder(config.dataset, data_dir=data_dir)
    builder.as_dataset(split=config.train_split)  # only builds the graph; fails if absent
    return builder, ""
  except (AssertionError, tfds.core.DatasetNotFoundError, FileNotFoundError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return None, first.split(". ")[0].rstrip(".")  # TFDS's first sentence; the fix follows


def get_builder(config, *, process_index: int = 0, process_count: int = 1):
  """The TFDS builder; downloads and prepares the data first if it is missing and
  ``config.download`` allows it (process 0 prepares, the others wait); else a ConfigError
  saying where it looked and how to make the data available."""
  data_dir = config_lib.data_dir(config)
  where = data_dir or "TFDS's default data_dir (~/tensorflow_datasets)"
  builder, why = _open(config, data_dir)
  if builder is not None:
    return builder
  if is_imagenet(config) or not datasets.get(config.dataset).downloadable:
    raise ConfigError(f"dataset {config.dataset!r} not found in {where} ({why}); "
                      f"{_IMAGENET_HELP}")
  fix = (f"prepare it once with `tfds build {config.dataset} --data_dir <dir>` on a machine "
         "with internet, then pass --config.data_dir=<dir> or set TFDS_DATA_DIR")
  if not config.download:
    raise ConfigError(f"dataset {config.dataset!r} not found in {where} ({why}); {fix} (or "
                      "--config.download=True to let TFDS download it here).")
  failure = _download(config, data_dir, process_index)
  if process_count > 1:
    multihost_utils.sync_global_devices(f"mssar_jax: {config.dataset} prepared")
  builder, why = _open(config, data_dir)
  if builder is None:
    raise ConfigError(f"dataset {config.dataset!r} not found in {where} and TFDS could not "
                      f"download it ({failure or why}); {fix}.")
  return builder


def _download(config, data_dir, process_index: int) -> str:
  """Process 0 downloads and prepares the dataset; returns why it failed ('' if it did not)."""
  if process_index != 0:
    return ""
  print(f"{config.dataset} not found; downloading and preparing it with TFDS in "
        f"{data_dir or '~/tensorflow_datasets'} (once)", flush=True)
  try:
    tfds.builder(config.dataset, data_dir=data_dir).download_and_prepare()
  except Exception as e:  # pylint: disable=broad-exception-caught  (reported in one line)
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
  return ""


def _num_examples(builder, split) -> int:
  """Split size from the dataset info, or by counting (mock data has no split info)."""
  try:
    n = builder.info.splits[split].num_examples
    if n:
      return int(n)
  except (KeyError, ValueError, TypeError):
    pass
  ds = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
  return int(ds.reduce(np.int64(0), lambda n, _: n + 1).numpy())


def _global_order(config) -> bool:
  """Whether every process reads the whole train split in one global order (docstring)."""
  return not config.shuffle_files


def _train_split(config, process_index, process_count):
  if _global_order(config):
    return config.train_split
  return tfds.even_splits(config.train_split, n=process_count, drop_remainder=True)[process_index]


def _eval_splits(config, process_count):
  return tfds.even_splits(config.eval_split, n=process_count, drop_remainder=False)




def get_info(config, builder, *, local_batch: int, local_eval_batch: int,
             process_index: int, process_count: int) -> DataInfo:
  """Sizes of the data seen by this process; ConfigError if a batch exceeds the data."""
  available = _num_examples(builder, _train_split(config, process_index, process_count))
  read_batch = local_batch * process_count if _global_order(config) else local_batch
  steps_per_epoch = available // read_batch
  if steps_per_epoch < 1:
    raise ConfigError(f"the batch ({read_batch}) exceeds the {available} training examples "
                      f"read by each process; lower config.batch_size.")
  eval_sizes = [_num_examples(builder, s) for s in _eval_splits(config, process_count)]
  if process_count == 1:
    eval_sizes = eval_sizes[:1]
  return DataInfo(
      num_classes=int(builder.info.features["label"].num_classes),
      image_size=config_lib.image_size(config),
      train_examples=available,
      steps_per_epoch=steps_per_epoch,
      eval_examples=sum(eval_sizes),
      eval_steps=math.ceil(max(eval_sizes) / local_eval_batch))


# ---------------------------------------------------------------------------------------------
# Preprocessing.

def _resize(image, size):
  """Bilinear resize to size x size (rounded back to uint8); unchanged if already that size."""
  if image.shape[0] == size and image.shape[1] == size:
    return image
  return _to_uint8(tf.image.resize(image, [size, size], method="bilinear"))


def _to_uint8(image):
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _cifar_train(example, seed, size):
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  image = tf.pad(example["image"], [[4, 4], [4, 4], [0, 0]])
  image = tf.image.stateless_random_crop(image, [32, 32, 3], seed=crop_seed)
  image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
  return _resize(image, size)


def _cifar_eval(example, size):
  return _resize(example["image"], size)


def _imagenet_train(example, seed, size):
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  data = example["image"]
  begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.io.extract_jpeg_shape(data), tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
      seed=crop_seed, min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3),
      area_range=(0.08, 1.0), max_attempts=10, use_image_if_no_bounding_boxes=True)
  window = tf.stack([begin[0], begin[1], crop[0], crop[1]])
  image = tf.io.decode_and_crop_jpeg(data, window, channels=3)
  image = _to_uint8(tf.image.resize(image, [size, size], method="bilinear"))
  return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def _imagenet_eval(example, size):
  data = example["image"]
  shape = tf.io.extract_jpeg_shape(data)
  side = tf.cast(0.875 * tf.cast(tf.reduce_min(shape[:2]), tf.float32), tf.int32)
  window = tf.stack([(shape[0] - side + 1) // 2, (shape[1] - side + 1) // 2, side, side])
  image = tf.io.decode_and_crop_jpeg(data, window, channels=3)
  return _to_uint8(tf.image.resize(image, [size, size], method="bilinear"))


def _decoders(config):
  return {"image": tfds.decode.SkipDecoding()} if is_imagenet(config) else None


def epoch_seed(seed: int, epoch):
  """A non-negative int64 seed for (seed, epoch), computed in the graph (epoch a tensor)."""
  pair = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])
  value = tf.random.stateless_uniform([], seed=pair, minval=None, maxval=None, dtype=tf.int64)
  return tf.bitwise.right_shift(value, 2) + 2 ** 61  # positive: no shift sign issues


def pipeline_options() -> tf.data.Options:
  """big_vision's threading: a private pool of the host's cores, one thread per op."""
  options = tf.data.Options()
  options.threading.private_threadpool_size = max(os.cpu_count() or 1, 1)
  options.threading.max_intra_op_parallelism = 1
  options.deterministic = True
  return options


# ---------------------------------------------------------------------------------------------
# Datasets.

class TrainData:
  """This process's infinite, resumable train stream of numpy batches (module docstring)."""

  def __init__(self, config, builder, info: DataInfo, *, local_batch: int,
               process_index: int, process_count: int):
    self._config = config
    self._info = info
    self._local_batch = local_batch
    self._process_index = process_index
    self._process_count = process_count if _global_order(config) else 1
    split = _train_split(config, process_index, process_count)
    if config.cache and not config.shuffle_files:
      self._source = builder.as_dataset(split=split, shuffle_files=False).cache()
    else:
      read = tfds.ReadConfig(shuffle_seed=config.seed, shuffle_reshuffle_each_iteration=False)
      self._source = builder.as_dataset(split=split, shuffle_files=config.shuffle_files,
                                        read_config=read, decoders=_decoders(config))

  def dataset(self, start_step: int = 0) -> tf.data.Dataset:
    """Batches for steps start_step, start_step + 1, ... (one pipeline, forever)."""
    config, batch = self._config, self._local_batch
    first_epoch, skip = divmod(start_step, self._info.steps_per_epoch)
    read_batch = batch * self._process_count  # global batch if all processes read everything
    per_epoch = self._info.steps_per_epoch * read_batch

    def epoch(e):
      seed = epoch_seed(config.seed, e)
      ds = self._source.shuffle(config.shuffle_buffer, seed=seed, reshuffle_each_iteration=False)
      ds = ds.take(per_epoch).enumerate()
      ds = ds.skip(tf.where(e == first_epoch, tf.constant(skip * read_batch, tf.int64),
                            tf.constant(0, tf.int64)))
      if self._process_count > 1:  # keep this process's rows of each global batch
        p = self._process_index
        ds = ds.filter(lambda i, _: (i % read_batch) // batch == p)
      return ds.map(lambda i, example: (seed, i, example))

    augment = _imagenet_train if is_imagenet(config) else _cifar_train
    size = self._info.image_size

    def prepare(seed, index, example):
      image = augment(example, tf.stack([seed, index]), size)
      return {"image": image, "label": tf.cast(example["label"], tf.int32)}

    ds = tf.data.Dataset.range(first_epoch, 2 ** 62).flat_map(epoch)
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch, drop_remainder=True).prefetch(config.prefetch)
    return ds.with_options(pipeline_options())

  def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Numpy batches for steps start_step, start_step + 1, ..."""
    return self.dataset(start_step).as_numpy_iterator()


def eval_dataset(config, builder, info: DataInfo, *, local_batch: int, process_index: int,
                 process_count: int) -> tf.data.Dataset:
  """This process's padded eval batches {'image', 'label', 'mask'} (``info.eval_steps``)."""
  size = info.image_size
  preprocess = _imagenet_eval if is_imagenet(config) else _cifar_eval

  def prepare(example):
    return {"image": preprocess(example, size),
            "label": tf.cast(example["label"], tf.int32), "mask": tf.constant(True)}

  split = _eval_splits(config, process_count)[process_index]
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders=_decoders(config))
  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  padding = tf.data.Dataset.from_tensors({
      "image": tf.zeros([size, size, 3], tf.uint8), "label": tf.constant(0, tf.int32),
      "mask": tf.constant(False)}).repeat()
  ds = ds.concatenate(padding).take(info.eval_steps * local_batch)
  ds = ds.batch(local_batch, drop_remainder=True)
  if config.cache:
    ds = ds.cache()
  return ds.prefetch(config.prefetch).with_options(pipeline_options())


def hide_accelerators_from_tensorflow() -> None:
  """tf.data runs on the host: keep TensorFlow off the GPUs so JAX has their memory."""
  tf.config.set_visible_devices([], "GPU")
