"""Hand-written CPU kernels for the fused BatchNorm + recalibration gate (same function).

``backends.cpu.folded`` computes MS-SAR's gate from a block's last convolution output x
(N, H, W, C) on 2x2 cells. On XLA:CPU those steps are a dozen small fused loops and dot
products per block, each a pass over memory; five XLA FFI handlers (``gate_kernels.cc``) do
them in one pass each, 16 channels per vector instruction:

    pool_stats(x)          = (CellMean_2x2(x), mean_c(x), var_c(x))   one read of x
    squeeze(m, a, b, W, c) = (m a + b) W + c                           per cell, in registers
    squeeze_backward(...)  = dm, dW, dc, da, db of the squeeze          one read of m
    excite(h, W, c)        = sigmoid(relu(h) W + c)                    per cell, in registers
    gate_backward(...)     = dh, dW, dc, da, db of folded._excite_and_gate   one read of g, x

(the sigmoid is a Cephes-style exp polynomial: within 3e-7 of XLA's). ``backends.cpu.folded``
calls them when the CPU backend asks for them (one CPU device) and the shapes fit (``fits``:
float32, C a multiple of 16 up to 256, 2x2 cells for the gate, the cells' means for the
squeeze); otherwise it runs its jnp code, which is their reference. The custom calls have no
sharding rule: on a sharded batch XLA gathers their operands onto one device (still exact).
The library is built on first use with ``-march=native`` (``build``, cached per CPU); if that
fails, ``LIBRARY.available()`` is False and ``LIBRARY.unavailable_reason`` says why.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from mssar_jax.backends.cpu import build

_SOURCE = Path(__file__).with_name("gate_kernels.cc")
_TARGETS = ("PoolStats", "Squeeze", "SqueezeBackward", "Excite", "GateBackward")


LIBRARY = build.FfiLibrary(
    lambda: build.build(_SOURCE, "libmssar_gate", flags=["-march=native"]),
    {f"mssar_gate_{name}": f"Mssar{name}" for name in _TARGETS})


def fits(x, cell=(1, 1)) -> bool:
  """Whether the kernels take x (N, H, W, C) with these cells: float32, C a multiple of 16 up
  to 256, H and W multiples of the cells, and the cells 2x2 (the gate) or 1x1 (the squeeze,
  on the cells' means)."""
  c = x.shape[-1]
  return (tuple(cell) in ((2, 2), (1, 1)) and x.ndim == 4 and x.dtype == jnp.float32
          and c % 16 == 0 and c <= 256 and x.shape[1] % cell[0] == 0
          and x.shape[2] % cell[1] == 0)


def _f32(shape) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), jnp.float32)


def _call(name, outs, *args):
  if not LIBRARY.available():  # registers the FFI targets on first use
    raise RuntimeError(f"gate kernels unavailable: {LIBRARY.unavailable_reason}")
  return jax.ffi.ffi_call(f"mssar_gate_{name}", outs)(*args)


def pool_stats(x):
  """(CellMean_2x2(x), mean, var) of x (N, H, W, C) float32; var is the biased variance."""
  n, h, w, c = x.shape
  outs = (_f32((n, h // 2, w // 2, c)), _f32((c,)), _f32((c,)))
  return _call("PoolStats", outs, x)


def squeeze(m, a, b, kernel, bias):
  """(m a + b) kernel + bias for m (..., C), a and b (C,), kernel (C, K), bias (K,); float32."""
  return _call("Squeeze", _f32(m.shape[:-1] + kernel.shape[1:]), m, a, b, kernel, bias)


def squeeze_backward(m, a, b, kernel, dz):
  """(dm, dkernel, dbias, da, db) of ``squeeze`` given dz, the gradient of its output."""
  outs = (_f32(m.shape), _f32(kernel.shape), _f32(kernel.shape[1:]), _f32(a.shape),
          _f32(a.shape))
  return _call("SqueezeBackward", outs, m, a, b, kernel, dz)


def excite(h, kernel, bias):
  """sigmoid(relu(h) kernel + bias) for h (..., K), kernel (K, C), bias (C,); float32."""
  return _call("Excite", _f32(h.shape[:-1] + kernel.shape[1:]), h, kernel, bias)


def gate_backward(g, x, a, b, h, kernel, score, g_score):
  """(dh, dkernel, dbias, da, db) of folded's gate on 2x2 cells, all but dx (see .cc)."""
  outs = (_f32(h.shape), _f32(kernel.shape), _f32(a.shape), _f32(a.shape), _f32(a.shape))
  return _call("GateBackward", outs, g, x, a, b, h, kernel, score, g_score)

