"""What measurably helps XLA:CPU train these networks (docs/performance.md): an implementation
of the same function, handed to the networks by ``mssar_jax.backends.choose``.

* ``onednn_conv``: convolutions (forward and both gradients) as oneDNN calls through XLA's FFI;
* ``batch_norm``: BatchNorm with a two-pass hand-written gradient;
* ``folded``: SE / MS-SAR with the preceding BatchNorm folded into their pooling and gate, with
  hand-written gradients and, optionally, ``gate_kernels`` (hand-written CPU kernels);
* an optimization barrier on every residual block's output, so XLA:CPU keeps it in memory
  instead of recomputing the chain of block outputs inside each consumer;
The process set-up that also helps (glibc malloc tunables, XLA flags) runs before JAX starts,
in ``mssar_jax.cpu_process``.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax

from mssar_jax.backends.cpu import batch_norm, folded, gate_kernels, onednn_conv
from mssar_jax.models.common import Implementation


def implementation(*, onednn: bool, kernels: bool) -> Implementation:
  """The CPU implementation; ``onednn`` / ``kernels`` use the native libraries (which must
  then be available: ``onednn_conv.LIBRARY.available()``, ``gate_kernels.LIBRARY...``)."""
  parts = ["two-pass BatchNorm gradient", "BatchNorm folded into the recalibration",
           "block-output barriers"]
  conv = nn.Conv
  if onednn:
    conv = functools.partial(nn.Conv, conv_general_dilated=onednn_conv.conv_general_dilated)
    parts.insert(0, "oneDNN convolutions")
  if kernels:
    parts.append("gate kernels")
  return Implementation(
      name=f"cpu ({', '.join(parts)})", conv=conv, norm=batch_norm.BatchNorm,
      norm_recalibrate=functools.partial(folded.norm_recalibrate, kernels=kernels),
      block_output=jax.lax.optimization_barrier)


def native_status(device_count: int) -> tuple[bool, bool, list[str]]:
  """(oneDNN convolutions usable, gate kernels usable, notes on what is not and why)."""
  notes = []
  if device_count > 1:
    return False, False, [f"native kernels off: {device_count} devices (no sharding rule)"]
  if jax.__version_info__ < (0, 11):
    # Inside nn.scan'd blocks jax 0.10 gave oneDNN-kernel gradients 1e-3 off XLA's
    # (tests/test_native_conv.py); 0.11 and later agree to float rounding.
    onednn = False
    notes.append("oneDNN convolutions need jax >= 0.11 (Python >= 3.12)")
  else:
    onednn = onednn_conv.LIBRARY.available()
  if not onednn and not notes:
    notes.append(f"oneDNN unavailable: {onednn_conv.LIBRARY.unavailable_reason}")
  kernels = gate_kernels.LIBRARY.available()
  if not kernels:
    notes.append(f"gate kernels unavailable: {gate_kernels.LIBRARY.unavailable_reason}")
  return onednn, kernels, notes
