"""Convolutions that call oneDNN directly on XLA:CPU (an optional speed-up, same function).

XLA:CPU lowers a convolution's weight gradient to a slow path: it transposes the activations
(batch innermost) and runs a generic kernel, several times oneDNN's time
(docs/performance.md). This module gives nn.Conv a
``conv_general_dilated`` whose forward, input-gradient and weight-gradient convolutions are
oneDNN primitives called through XLA's FFI (``onednn_conv.cc``), with the exact maths of
``lax.conv_general_dilated`` for NHWC inputs and HWIO kernels:

    y[n, p, q, o] = sum_{kh, kw, i} x[n, p*s_h + kh - pad_top, q*s_w + kw - pad_left, i] w[kh, kw, i, o]
    dx = conv_transpose(dy, w),   dw[kh, kw, i, o] = sum_{n, p, q} x[n, p*s_h + kh - pad_top, ...] dy[n, p, q, o]

(zero outside the image). Anything else (other dtypes, dilation, groups, string padding) goes
to ``lax.conv_general_dilated`` unchanged.

Threads: each oneDNN call runs on one thread. A convolution of 5e7 flops or more is split by
batch into one chunk per thread of XLA's intra-op pool; the calling thread and tasks on that
pool take the chunks in turn, and weight gradients add the chunks' parts. (oneDNN's OpenMP
teams, beside XLA's own threads, waited for cores busy with XLA's concurrent work.)

The shared library is compiled on first use with the system C++ compiler against the oneDNN
wheels (``onednn-cpu-gomp`` and ``onednn-devel-cpu-gomp``, the ``[onednn]`` extra) and
jaxlib's FFI headers, and cached under ``$MSSAR_JAX_CACHE`` (default ``~/.cache/mssar_jax``).
If any of that is missing, ``LIBRARY.available()`` is False, ``LIBRARY.unavailable_reason``
says why, and the networks keep XLA's convolutions.

The CPU backend (``backends.cpu.implementation``) gives nn.Conv this module's
``conv_general_dilated`` on a single CPU device: the custom call has no sharding rule, so with
several devices XLA's own convolutions are kept.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mssar_jax.backends.cpu import build

_SOURCE = Path(__file__).with_name("onednn_conv.cc")
_TARGETS = {
    "forward": "MssarOnednnConvForward",
    "backward_data": "MssarOnednnConvBackwardData",
    "backward_weights": "MssarOnednnConvBackwardWeights",
}


def _onednn_dirs() -> tuple[Path, Path]:
  """(include dir, lib dir) of the oneDNN wheels, which install into the environment prefix."""
  for prefix in (os.environ.get("MSSAR_ONEDNN_ROOT"), sys.prefix, sys.base_prefix):
    if not prefix:
      continue
    include, lib = Path(prefix) / "include", Path(prefix) / "lib"
    if (include / "oneapi" / "dnnl" / "dnnl.hpp").exists() and (lib / "libdnnl.so.3").exists():
      return include, lib
  raise RuntimeError("oneDNN not found: pip install -e '.[onednn]' "
                     "(onednn-cpu-gomp and onednn-devel-cpu-gomp)")


def _build() -> Path:
  """Compiles onednn_conv.cc once per (source, jaxlib, oneDNN) and returns the .so path."""
  include, lib = _onednn_dirs()
  return build.build(_SOURCE, "libmssar_onednn", flags=["-O2", "-fopenmp", f"-I{include}"],
                     link=[f"-L{lib}", "-l:libdnnl.so.3", f"-Wl,-rpath,{lib}"],
                     extra_digest=[str(include), (lib / "libdnnl.so.3").resolve().name])


LIBRARY = build.FfiLibrary(_build, {f"mssar_onednn_conv_{name}": symbol
                                     for name, symbol in _TARGETS.items()})


def _attrs(strides, padding) -> dict:
  (pt, pb), (pl, pr) = padding
  return dict(stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
              pad_top=np.int64(pt), pad_bottom=np.int64(pb), pad_left=np.int64(pl),
              pad_right=np.int64(pr))


def _call(name, out_shape, a, b, strides, padding):
  if not LIBRARY.available():  # registers the FFI targets on first use
    raise RuntimeError(f"oneDNN convolutions unavailable: {LIBRARY.unavailable_reason}")
  out = jax.ShapeDtypeStruct(out_shape, jnp.float32)
  return jax.ffi.ffi_call(f"mssar_onednn_conv_{name}", out)(a, b, **_attrs(strides, padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_nhwc(x, w, strides, padding):
  """``lax.conv_general_dilated(x, w, strides, padding, ('NHWC', 'HWIO', 'NHWC'))`` by oneDNN.

  ``strides`` is a pair of ints and ``padding`` a pair of (low, high) int pairs; float32 only.
  """
  (kh, kw), (sh, sw) = w.shape[:2], strides
  (pt, pb), (pl, pr) = padding
  n, h, wd, _ = x.shape
  out_shape = (n, (h + pt + pb - kh) // sh + 1, (wd + pl + pr - kw) // sw + 1, w.shape[3])
  return _call("forward", out_shape, x, w, strides, padding)


def _conv_fwd(x, w, strides, padding):
  return conv_nhwc(x, w, strides, padding), (x, w)


def _conv_bwd(strides, padding, residuals, dy):
  x, w = residuals
  dx = _call("backward_data", x.shape, dy, w, strides, padding)
  dw = _call("backward_weights", w.shape, x, dy, strides, padding)
  return dx, dw


conv_nhwc.defvjp(_conv_fwd, _conv_bwd)

_NHWC_HWIO = jax.lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """Drop-in for ``lax.conv_general_dilated`` (nn.Conv's ``conv_general_dilated`` field).

  Uses ``conv_nhwc`` for 2-D float32 NHWC/HWIO convolutions with explicit padding, no
  dilation and one group; everything else goes to ``lax.conv_general_dilated``.
  """
  dims = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  explicit = (not isinstance(padding, str) and len(padding) == 2
              and all(len(p) == 2 for p in padding))
  simple = (lhs.ndim == 4 and dims == _NHWC_HWIO and explicit
            and lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32
            and all(d == 1 for d in (lhs_dilation or (1, 1)))
            and all(d == 1 for d in (rhs_dilation or (1, 1)))
            and feature_group_count == 1 and batch_group_count == 1
            and preferred_element_type in (None, jnp.float32))
  if simple:
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    return conv_nhwc(lhs, rhs, tuple(int(s) for s in window_strides), padding)
  return jax.lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, batch_group_count=batch_group_count,
      precision=precision, preferred_element_type=preferred_element_type)

