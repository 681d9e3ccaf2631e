"""What the networks share: their layer implementations, the head, block stacking.

A network has one field ``impl`` (an ``Implementation``): the convolution and BatchNorm
modules, how a block's last BatchNorm and its recalibration are computed, and a hook on each
block's output. The default is the plain flax composition, right on every backend;
``mssar_jax.backends`` hands a network another implementation of the same function where one
is faster (the CPU's). In ``__call__`` a network binds them to its dtype and mode
(``Layers``) and passes that to its blocks, as flax's ResNet example passes ``conv`` and
``norm`` partials. BatchNorm has no ``axis_name``: under ``jax.jit`` with a batch sharded over a
device mesh its statistics are those of the global batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

ModuleDef = Any

# He et al. (2015) initialisation, as in torchvision: N(0, 2 / fan_out).
he_normal = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def identity(x):
  return x


def norm_then_recalibrate(norm: ModuleDef, recalibration: ModuleDef | None, y,
                          **norm_kwargs):
  """recalibration(norm(y)) (the reference); ``norm_kwargs`` (name, scale_init) go to norm."""
  y = norm(**norm_kwargs)(y)
  return y if recalibration is None else recalibration(name="recalibration")(y)


@dataclasses.dataclass(frozen=True)
class Implementation:
  """How a network computes its layers; every implementation computes the same function.

  Attributes:
    name: shown in the run's header.
    conv: convolution module (nn.Conv's fields).
    norm: BatchNorm module (nn.BatchNorm's fields and variables).
    norm_recalibrate: ``f(norm, recalibration, y, **norm_kwargs)``, a block's last BatchNorm
      followed by its recalibration (``norm_then_recalibrate`` or a fused form).
    block_output: applied to every residual block's output.
  """
  name: str = "xla"
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  norm_recalibrate: Callable = norm_then_recalibrate
  block_output: Callable = identity


@dataclasses.dataclass(frozen=True)
class Layers:
  """An implementation bound to one network call: compute dtype, train / eval mode and the
  recalibration constructor (None for 'none')."""
  impl: Implementation
  recalibration: ModuleDef | None
  dtype: Any
  train: bool

  def conv(self, features, kernel_size=(3, 3), strides=1, padding=None, **kwargs):
    """No bias, He init, float32 params; padding k // 2 on each side (PyTorch's symmetric
    padding, so strided convs see the pixels the published networks see)."""
    strides = (strides, strides) if isinstance(strides, int) else strides
    if padding is None:
      padding = [(k // 2, k // 2) for k in kernel_size]
    return self.impl.conv(features, kernel_size, strides=strides, padding=padding,
                          use_bias=False, kernel_init=he_normal, dtype=self.dtype, **kwargs)

  def norm(self, **kwargs):
    """BatchNorm with PyTorch's momentum (0.9 here = 0.1 there) and eps; stats in float32."""
    return self.impl.norm(use_running_average=not self.train, momentum=0.9, epsilon=1e-5,
                          dtype=self.dtype, **kwargs)

  def norm_recalibrate(self, y, **norm_kwargs):
    """The block's last BatchNorm and its recalibration (if any)."""
    return self.impl.norm_recalibrate(self.norm, self.recalibration, y, **norm_kwargs)

  def recalibrate(self, y):
    """The recalibration of a block whose branch does not end in a BatchNorm."""
    return y if self.recalibration is None else self.recalibration(name="recalibration")(y)

  def block_output(self, x):
    return self.impl.block_output(x)


def classifier(x, num_classes: int, dtype):
  """Global average pooling and a Dense layer; logits are returned in float32."""
  x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(dtype)
  x = nn.Dense(num_classes, dtype=dtype, name="head")(x)
  return x.astype(jnp.float32)


class _ScanBody(nn.Module):
  """Adapts a block ``x -> x`` to the ``(carry, x) -> (carry, y)`` signature of nn.scan."""
  block: ModuleDef

  @nn.compact
  def __call__(self, carry, _):
    return self.block(name="block")(carry), None


def repeat_block(block: ModuleDef, count: int, x, name: str, scan: bool = False):
  """Applies ``count`` identical blocks to x, unrolled (default) or as one nn.scan.

  Scanning compiles the block body once instead of ``count`` times (parameters of the
  scanned blocks are stacked along a leading axis of size ``count``); XLA:CPU runs the
  scanned backward pass much slower, so networks unroll unless asked to scan.
  """
  if count <= 0:
    return x
  if not scan or count == 1:
    for i in range(count):
      x = block(name=f"{name}_{i}")(x)
    return x
  stack = nn.scan(_ScanBody, variable_axes={True: 0}, split_rngs={"params": True},
                  length=count)
  x, _ = stack(block=block, name=name)(x, None)
  return x
