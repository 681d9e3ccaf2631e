"""The model zoo, selected by name.

    model = get_model('cifar_resnet20', num_classes=10, recalibration='ms_sar', scales=(2, 4, 8))
    variables = model.init(jax.random.key(0), images, train=False)   # {'params', 'batch_stats'}
    logits, updates = model.apply(variables, images, train=True, mutable=['batch_stats'])

Keyword arguments of ``get_model`` go to the network when they name one of its fields
(``depth``, ``growth_rate``, ``zero_init_residual``, ``scan_blocks``, ...) and to the
recalibration module otherwise (``reduction``, ``scales``, ``kernel_size``, ``weighting``, ...).
``impl`` (``common.Implementation``) says how the layers are computed; the default is the plain
flax composition, and ``mssar_jax.backends.choose`` picks a faster one per backend.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax.numpy as jnp

from mssar_jax.errors import ConfigError
from mssar_jax.models.common import Implementation
from mssar_jax.models.cifar_resnet import CifarPreActResNet, CifarResNet
from mssar_jax.models.densenet import CifarDenseNet, DenseNet
from mssar_jax.models.resnet import ResNet
from mssar_jax.recalibration import get_recalibration, make_recalibration

# The last ImageNet stage is 7x7 at 224x224, so MS-SAR's default scales there are (2, 4).
_IMAGENET_RECALIBRATION = {"ms_sar": {"scales": (2, 4)}}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A registered network: its constructor, input size and published parameter count."""
  constructor: Callable[..., Any]
  input_size: int
  published: str
  recalibration_defaults: dict = dataclasses.field(default_factory=dict)


def _cifar_resnet(depth):
  return ModelSpec(functools.partial(CifarResNet, depth=depth), 32,
                   "He et al. 2016, Table 6")


_MODELS: dict[str, ModelSpec] = {
    "cifar_resnet20": _cifar_resnet(20),
    "cifar_resnet32": _cifar_resnet(32),
    "cifar_resnet44": _cifar_resnet(44),
    "cifar_resnet56": _cifar_resnet(56),
    "cifar_resnet110": _cifar_resnet(110),
    "cifar_preact_resnet164": ModelSpec(functools.partial(CifarPreActResNet, depth=164), 32,
                                        "He et al. 2016b, Table 2 (1.7M)"),
    "cifar_densenet40": ModelSpec(
        functools.partial(CifarDenseNet, depth=40, growth_rate=12), 32,
        "Huang et al. 2017, Table 2 (1.0M)"),
    "cifar_densenet_bc100": ModelSpec(
        functools.partial(CifarDenseNet, depth=100, growth_rate=12, bottleneck=True,
                          compression=0.5), 32, "Huang et al. 2017, Table 2 (0.8M)"),
    "resnet50": ModelSpec(functools.partial(ResNet, stage_sizes=(3, 4, 6, 3)), 224,
                          "torchvision (25,557,032)", _IMAGENET_RECALIBRATION),
    "resnet101": ModelSpec(functools.partial(ResNet, stage_sizes=(3, 4, 23, 3)), 224,
                           "torchvision (44,549,160)", _IMAGENET_RECALIBRATION),
    "densenet121": ModelSpec(functools.partial(DenseNet, block_sizes=(6, 12, 24, 16)), 224,
                             "torchvision (7,978,856)", _IMAGENET_RECALIBRATION),
}

_RESERVED = {"num_classes", "recalibration", "dtype", "impl", "parent", "name"}


def list_models() -> list[str]:
  """Names accepted by ``get_model``."""
  return list(_MODELS)


def get_spec(name: str) -> ModelSpec:
  if name not in _MODELS:
    raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(_MODELS)}.")
  return _MODELS[name]


def input_size(name: str) -> int:
  """Training image size (height = width) the network was designed for."""
  return get_spec(name).input_size


def model_arguments(name: str) -> list[str]:
  """Network fields that ``get_model`` accepts as keyword arguments."""
  cls = get_spec(name).constructor.func
  return [f.name for f in dataclasses.fields(cls) if f.name not in _RESERVED]


def get_model(name: str, *, num_classes: int, recalibration: str = "none",
              dtype: Any = jnp.float32, impl: Implementation = Implementation(), **kwargs):
  """Builds network ``name`` with ``recalibration`` ('none', 'se' or 'ms_sar') in its blocks.

  Args:
    name: one of ``list_models()``.
    num_classes: size of the classifier.
    recalibration: name from ``mssar_jax.recalibration.list_recalibrations()``.
    dtype: compute dtype (e.g. jnp.bfloat16); parameters and BatchNorm statistics stay float32.
    impl: how the layers are computed (same function whichever).
    **kwargs: network fields, then recalibration arguments (see module docstring).

  Raises:
    ConfigError: unknown name or argument, or an invalid value (one line naming the fix).
  """
  spec = get_spec(name)
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
    raise ConfigError(f"num_classes must be a positive integer (got {num_classes!r}); "
                      "use e.g. num_classes=10 for CIFAR-10.")
  fields = model_arguments(name)
  recal_kwargs = {k: v for k, v in kwargs.items() if k not in fields}
  cls = get_recalibration(recalibration)
  if cls is not None:
    injected = {"dtype": dtype}
    if "conv" in {f.name for f in dataclasses.fields(cls)}:
      injected["conv"] = impl.conv
    recal_kwargs = {**spec.recalibration_defaults.get(recalibration, {}), **recal_kwargs,
                    **injected}
  try:
    recal = make_recalibration(recalibration or "none", **recal_kwargs)
  except ConfigError as e:
    raise ConfigError(f"get_model({name!r}): {e} Model arguments: {', '.join(fields)}.") from None
  return spec.constructor(num_classes=num_classes, recalibration=recal, dtype=dtype, impl=impl,
                          **{k: v for k, v in kwargs.items() if k in fields})


__all__ = ["get_model", "list_models", "input_size", "model_arguments", "get_spec",
           "ModelSpec", "Implementation"]
