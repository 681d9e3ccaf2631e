"""Recalibration mechanisms, selected by name.

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
  """Constructor arguments accepted by recalibration ``name``."""
  cls = get_recalibration(name)
  if cls is None:
    return []
  return [f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]


def make_recalibration(name: str, **kwargs):
  """A constructor ``partial(cls, **kwargs)`` checked now (bad arguments raise here), or None."""
  cls = get_recalibration(name)
  if cls is None:
    if kwargs:
      raise ConfigError(f"recalibration 'none' takes no arguments (got {sorted(kwargs)}); "
                        "drop them or choose 'se' or 'ms_sar'.")
    return None
  allowed = recalibration_arguments(name)
  unknown = sorted(set(kwargs) - set(allowed))
  if unknown:
    raise ConfigError(f"recalibration {name!r} has no argument {', '.join(unknown)}; "
                      f"valid: {', '.join(allowed)}.")
  if "scales" in kwargs and kwargs["scales"] is not None:
    kwargs["scales"] = tuple(kwargs["scales"]) if not isinstance(kwargs["scales"], int) else kwargs["scales"]
  cls(**kwargs)  # runs the argument checks in __post_init__
  return functools.partial(cls, **kwargs)


__all__ = ["SqueezeExcite", "MultiScaleSAR", "get_recalibration", "make_recalibration",
           "list_recalibrations", "recalibration_arguments"]
