"""Recalibration mechanisms, selected by name (timm's ``get_attn`` contract).

Every mechanism maps x (N, H, W, C) to x * score with score in (0, 1), and shares one
constructor contract: channels come from the input; ``reduction`` (r, default 16);
``min_channels`` (floor on C/r, default 4); ``dtype`` for compute with float32 params.

    get_recalibration('none')    -> None
    get_recalibration('se')      -> SqueezeExcite
    get_recalibration('ms_sar')  -> MultiScaleSAR
    make_recalibration(name, **kwargs) -> a checked constructor (functools.partial) or None
"""

from __future__ import annotations

import dataclasses
import functools

from mssar_jax.errors import ConfigError
from mssar_jax.recalibration.ms_sar import MultiScaleSAR
from mssar_jax.recalibration.se import SqueezeExcite

_REGISTRY = {
    "se": SqueezeExcite,
    "ms_sar": MultiScaleSAR,
}
# Fields set by the network or a backend, not by the user.
INJECTED = ("dtype", "param_dtype", "conv", "parent", "name")


def list_recalibrations() -> list[str]:
  """All names accepted by ``get_recalibration``, 'none' first."""
  return ["none", *_REGISTRY]


def get_recalibration(name: str):
  """The module class registered under ``name``, or None for 'none'."""
  if name is None or name == "none":
    return None
  if name not in _REGISTRY:
    raise ConfigError(f"unknown recalibration {name!r}; choose one of "
                      f"{', '.join(list_recalibrations())}.")
  return _REGISTRY[name]


def recalibration_arguments(name: str) -> list[str]:
  """Constructor arguments a user may set for recalibration ``name``."""
  cls = get_recalibration(name)
  if cls is None:
    return []
  return [f.name for f in dataclasses.fields(cls) if f.name not in INJECTED]


def make_recalibration(name: str, **kwargs):
  """A constructor ``partial(cls, **kwargs)`` checked now (bad arguments raise here), or None.

  ``kwargs`` may also hold the injected fields (dtype, param_dtype, conv).
  """
  cls = get_recalibration(name)
  user = sorted(k for k in kwargs if k not in INJECTED)
  if cls is None:
    if user:
      raise ConfigError(f"unknown argument {', '.join(user)} for recalibration 'none'; "
                        "drop it or choose 'se' or 'ms_sar'.")
    return None
  allowed = recalibration_arguments(name)
  unknown = [k for k in user if k not in allowed]
  if unknown:
    raise ConfigError(f"unknown argument {', '.join(unknown)} for recalibration {name!r}; "
                      f"valid: {', '.join(allowed)}.")
  cls(**kwargs)  # runs the argument checks in __post_init__
  return functools.partial(cls, **kwargs)


__all__ = ["SqueezeExcite", "MultiScaleSAR", "get_recalibration", "make_recalibration",
           "list_recalibrations", "recalibration_arguments"]
