"""Which implementation of the networks' layers a run uses, decided in one place.

``config.implementation`` (``choose``'s ``name``):

* ``xla``: the plain flax composition (``models.common.Implementation()``): nn.Conv,
  nn.BatchNorm with autodiff, the recalibration applied to the normalised map, pooling by
  ``reduce_window``. Right on every backend; what TPUs and GPUs run.
* ``cpu``: what measurably helps XLA:CPU (``backends.cpu``): oneDNN convolutions, a BatchNorm
  with a two-pass gradient, the BatchNorm folded into the recalibration, gate kernels,
  block-output barriers. The native kernels are used on a single device only.
* ``auto`` (default): ``cpu`` when JAX computes in float32 on CPU devices, else ``xla``.

Both compute the same function (tests compare outputs and gradients of every model).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mssar_jax.backends import cpu
from mssar_jax.errors import ConfigError
from mssar_jax.models.common import Implementation

CHOICES = ("auto", "xla", "cpu")


@dataclasses.dataclass(frozen=True)
class Choice:
  impl: Implementation
  reason: str  # why, for the run's header


def choose(name: str = "auto", *, dtype=jnp.float32, platform: str | None = None,
           device_count: int | None = None) -> Choice:
  """The implementation for ``name`` ('auto', 'xla' or 'cpu') on this backend."""
  if name not in CHOICES:
    raise ConfigError(f"config.implementation={name!r} is unknown; use one of "
                      f"{', '.join(CHOICES)}.")
  platform = platform or jax.default_backend()
  device_count = jax.device_count() if device_count is None else device_count
  if name == "auto":
    on_cpu = platform == "cpu" and jnp.dtype(dtype) == jnp.float32
    name = "cpu" if on_cpu else "xla"
    reason = f"auto on {platform}" + ("" if on_cpu or platform != "cpu" else
                                      f" with {jnp.dtype(dtype).name} compute")
  else:
    reason = "config.implementation"
  if name == "xla":
    return Choice(Implementation(), reason)
  onednn, kernels, notes = cpu.native_status(device_count)
  return Choice(cpu.implementation(onednn=onednn, kernels=kernels),
                "; ".join([reason, *notes]))
