"""Hand-written CPU kernels for the fused BatchNorm + recalibration gate (same function).

``recalibration.bn_fused`` computes MS-SAR's gate from a block's last convolution output x
(N, H, W, C) on 2x2 cells. On XLA:CPU those steps are a dozen small fused loops and dot
products per block, each a pass over memory; five XLA FFI handlers (``gate_kernels.cc``) do
them in one pass each, 16 channels per vector instruction:

    pool_stats(x)          = (CellMean_2x2(x), mean_c(x), var_c(x))   one read of x
    squeeze(m, a, b, W, c) = (m a + b) W + c                           per cell, in registers
    squeeze_backward(...)  = dm, dW, dc, da, db of the squeeze          one read of m
    excite(h, W, c)        = sigmoid(relu(h) W + c)                    per cell, in registers
    gate_backward(...)     = dh, dW, dc, da, db of bn_fused._excite_and_gate   one read of g, x

(the sigmoid is a Cephes-style exp polynomial: within 3e-7 of XLA's). Used when a model is
traced on JAX's CPU backend with one device, x is float32, C is a multiple of 16 up to 256
and the cells are 2x2 (the squeeze: the cells' means; ``usable``); otherwise bn_fused keeps
its jnp code. The mode, ``$MSSAR_GATE_KERNELS`` or ``use(...)``: 'auto' (default) as just
said, 'off' never, 'on' whenever the shapes allow, on any backend and device count (for
tests: the custom calls have no sharding rule, so XLA gathers a sharded batch onto one
device for them; tested). The library is built on first use with ``-march=native``
(``native.build``); if that fails, ``available()`` is False and ``unavailable_reason()``
says why.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp

from mssar_jax.native import build

_SOURCE = Path(__file__).with_name("gate_kernels.cc")
_TARGETS = ("PoolStats", "Squeeze", "SqueezeBackward", "Excite", "GateBackward")
_MODES = ("auto", "on", "off")
_mode = os.environ.get("MSSAR_GATE_KERNELS", "auto")
_unavailable_reason: str | None = None


@functools.cache
def _load() -> bool:
  global _unavailable_reason
  try:
    library = ctypes.cdll.LoadLibrary(
        str(build.build(_SOURCE, "libmssar_gate", flags=["-march=native"])))
    for name in _TARGETS:
      jax.ffi.register_ffi_target(f"mssar_gate_{name}",
                                  jax.ffi.pycapsule(getattr(library, f"Mssar{name}")),
                                  platform="cpu")
  except (RuntimeError, OSError) as e:
    _unavailable_reason = str(e)
    return False
  return True


def available() -> bool:
  """Whether the kernels can be used here (builds the library on first call)."""
  return _load()


def unavailable_reason() -> str | None:
  """Why ``available()`` is False (None if it is True or has not been asked yet)."""
  return _unavailable_reason


def enabled() -> bool:
  """Whether models traced now use the kernels where their shapes allow (mode, backend,
  device count and the library; see the module doc)."""
  if _mode not in _MODES:
    raise ValueError(f"MSSAR_GATE_KERNELS must be one of {_MODES}, got {_mode!r}")
  if _mode == "off":
    return False
  if _mode == "auto" and (jax.default_backend() != "cpu" or jax.device_count() != 1):
    return False
  return available()


def usable(x, cell=(1, 1)) -> bool:
  """Whether bn_fused uses the kernels on x (N, H, W, C) with these cells, if traced now:
  float32, C a multiple of 16 up to 256, H and W multiples of the cells, and the cells 2x2
  (the gate) or 1x1 (the squeeze, on the cells' means)."""
  c = x.shape[-1]
  shapes = (tuple(cell) in ((2, 2), (1, 1)) and x.ndim == 4 and x.dtype == jnp.float32
            and c % 16 == 0 and c <= 256 and x.shape[1] % cell[0] == 0
            and x.shape[2] % cell[1] == 0)
  return shapes and enabled()


@contextlib.contextmanager
def use(mode: str) -> Iterator[None]:
  """Within the block, models traced use the kernels as ``mode`` says ('auto', 'on', 'off')."""
  global _mode
  if mode not in _MODES:
    raise ValueError(f"gate kernel mode must be one of {_MODES}, got {mode!r}")
  previous, _mode = _mode, mode
  try:
    yield
  finally:
    _mode = previous


def _f32(shape) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), jnp.float32)


def pool_stats(x):
  """(CellMean_2x2(x), mean, var) of x (N, H, W, C) float32; var is the biased variance."""
  n, h, w, c = x.shape
  outs = (_f32((n, h // 2, w // 2, c)), _f32((c,)), _f32((c,)))
  return jax.ffi.ffi_call("mssar_gate_PoolStats", outs)(x)


def squeeze(m, a, b, kernel, bias):
  """(m a + b) kernel + bias for m (..., C), a and b (C,), kernel (C, K), bias (K,); float32."""
  return jax.ffi.ffi_call("mssar_gate_Squeeze", _f32(m.shape[:-1] + kernel.shape[1:]))(
      m, a, b, kernel, bias)


def squeeze_backward(m, a, b, kernel, dz):
  """(dm, dkernel, dbias, da, db) of ``squeeze`` given dz, the gradient of its output."""
  outs = (_f32(m.shape), _f32(kernel.shape), _f32(kernel.shape[1:]), _f32(a.shape),
          _f32(a.shape))
  return jax.ffi.ffi_call("mssar_gate_SqueezeBackward", outs)(m, a, b, kernel, dz)


def excite(h, kernel, bias):
  """sigmoid(relu(h) kernel + bias) for h (..., K), kernel (K, C), bias (C,); float32."""
  return jax.ffi.ffi_call("mssar_gate_Excite", _f32(h.shape[:-1] + kernel.shape[1:]))(
      h, kernel, bias)


def gate_backward(g, x, a, b, h, kernel, score, g_score):
  """(dh, dkernel, dbias, da, db) of bn_fused's gate on 2x2 cells, all but dx (see .cc)."""
  outs = (_f32(h.shape), _f32(kernel.shape), _f32(a.shape), _f32(a.shape), _f32(a.shape))
  return jax.ffi.ffi_call("mssar_gate_GateBackward", outs)(g, x, a, b, h, kernel, score, g_score)

