"""What the project knows of each dataset without reading it (no TensorFlow, no config
library: the train step and the model tools use it too)."""

from __future__ import annotations

import dataclasses

from mssar_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Dataset:
  num_classes: int
  mean: tuple[float, float, float]   # per-channel mean of the training images, 0-255 scale
  std: tuple[float, float, float]
  downloadable: bool                 # TFDS can download and prepare it unattended


DATASETS = {
    "cifar10": Dataset(10, (125.31, 122.95, 113.87), (62.99, 62.09, 66.70), True),
    "cifar100": Dataset(100, (129.30, 124.07, 112.43), (68.17, 65.39, 70.42), True),
    "imagenet2012": Dataset(1000, (123.675, 116.28, 103.53), (58.395, 57.12, 57.375), False),
}


def get(name: str) -> Dataset:
  """The dataset ``name``, or a ConfigError listing the supported ones."""
  if name not in DATASETS:
    raise ConfigError(f"config.dataset={name!r} is not supported; use one of "
                      f"{', '.join(DATASETS)}.")
  return DATASETS[name]
