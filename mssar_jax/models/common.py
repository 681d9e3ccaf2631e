"""Building blocks shared by the backbones: conv/norm constructors, the head, block stacking.

Blocks receive ``conv`` and ``norm`` constructors (functools.partial of nn.Conv /
``batch_norm.BatchNorm``, nn.BatchNorm's function and variables with a cheaper gradient) from
their network, so compute dtype, initialisers and train/eval mode are
decided once. BatchNorm has no ``axis_name``: under ``jax.jit`` with a batch sharded over a
device mesh its statistics are those of the global batch.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mssar_jax.models.batch_norm import BatchNorm
from mssar_jax.native import onednn_conv

ModuleDef = Any

# He et al. (2015) initialisation, as in torchvision: N(0, 2 / fan_out).
he_normal = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def make_conv(dtype) -> Callable[..., nn.Conv]:
  """A Conv constructor: no bias, He init, float32 params, compute in ``dtype``.

  Padding defaults to k // 2 on each side (PyTorch's symmetric padding), so strided convs
  see the same pixels as the published networks. In float32 on a single CPU device the
  convolutions call oneDNN directly when it is installed (``native.onednn_conv``: the same
  function, faster gradients); elsewhere they are XLA's.
  """
  def conv(features, kernel_size=(3, 3), strides=(1, 1), padding=None, **kwargs):
    if padding is None:
      padding = [(k // 2, k // 2) for k in kernel_size]
    if isinstance(strides, int):
      strides = (strides, strides)
    kwargs = {**onednn_conv.nn_conv_kwargs(dtype), **kwargs}
    return nn.Conv(features, kernel_size, strides=strides, padding=padding, use_bias=False,
                   kernel_init=he_normal, dtype=dtype, **kwargs)
  return conv


def make_norm(train: bool, dtype) -> Callable[..., BatchNorm]:
  """A BatchNorm constructor (momentum 0.9 = PyTorch's 0.1, eps 1e-5), stats in float32."""
  return functools.partial(BatchNorm, use_running_average=not train, momentum=0.9,
                           epsilon=1e-5, dtype=dtype)


def classifier(x, num_classes: int, dtype):
  """Global average pooling and a Dense layer; logits are returned in float32."""
  x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(dtype)
  x = nn.Dense(num_classes, dtype=dtype, name="head")(x)
  return x.astype(jnp.float32)


def materialize(x):
  """Identity that makes XLA keep ``x`` in memory instead of recomputing it (a performance hint).

  Used on every residual block's output. Without it XLA:CPU fuses the chain of block outputs
  (BN, ReLU, residual additions of several blocks) into each consumer that needs them in
  another layout, mainly the transposes feeding the backward weight convolutions, and
  recomputes that chain there: about 30% of a cifar_resnet20 train step on this CPU (README,
  "Performance"). The value and its gradient are unchanged.
  """
  return jax.lax.optimization_barrier(x)


def norm_recalibrate(norm: ModuleDef, recalibration: ModuleDef | None, y, **norm_kwargs):
  """recalibration(norm(y)): the block's last BatchNorm and its recalibration (if any).

  The recalibration receives the BatchNorm module and applies it inside its own pooling and
  gate (``recalibration.bn_fused``): the same function, without the normalised map in
  memory. Variable names are those of norm then recalibration applied in turn.
  """
  bn = norm(**norm_kwargs)
  if recalibration is None:
    return bn(y)
  return recalibration(name="recalibration")(y, norm=bn)


def recalibrate(recalibration: ModuleDef | None, y):
  """Applies the block's recalibration module (named 'recalibration') if there is one."""
  if recalibration is None:
    return y
  return recalibration(name="recalibration")(y)


class _ScanBody(nn.Module):
  """Adapts a block ``x -> x`` to the ``(carry, x) -> (carry, y)`` signature of nn.scan."""
  block: ModuleDef

  @nn.compact
  def __call__(self, carry, _):
    return self.block(name="block")(carry), None


def repeat_block(block: ModuleDef, count: int, x, name: str, scan: bool = False):
  """Applies ``count`` identical blocks to x, unrolled (default) or as one nn.scan.

  Scanning compiles the block body once instead of ``count`` times (parameters of the
  scanned blocks are stacked along a leading axis of size ``count``), but on XLA:CPU the
  scanned train step runs many times slower, so networks unroll unless asked to scan.
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
