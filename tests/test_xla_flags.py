"""train.py's XLA:CPU options: appended without overriding the user's, and they reach XLA."""

import os
import subprocess
import sys

import pytest

from mssar_jax import xla_flags

# Compiles one convolution in a fresh process (XLA flags are read when the CPU backend starts)
# after doing what train.py does first, and prints whether XLA lowered it to oneDNN.
_PROBE = """
from mssar_jax import xla_flags
xla_flags.add_xla_flags(xla_flags.FAST_CPU_FLAGS)
import jax, jax.numpy as jnp
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
hlo = jax.jit(conv).lower(jnp.zeros((8, 16, 16, 16)), jnp.zeros((3, 3, 16, 16))).compile().as_text()
print("onednn" if "__onednn$conv" in hlo else "no-onednn")
"""


def _probe(xla_flags_env: str) -> str:
  env = {**os.environ, "XLA_FLAGS": xla_flags_env, "TF_CPP_MIN_LOG_LEVEL": "2"}
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                       timeout=120, check=True)
  return out.stdout.strip().splitlines()[-1]


def test_add_xla_flags_appends_and_keeps_the_users_value(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_cpu_use_onednn=false")
  result = xla_flags.add_xla_flags(xla_flags.FAST_CPU_FLAGS)
  assert result.split() == ["--xla_force_host_platform_device_count=8", "--xla_cpu_use_onednn=false",
                            "--xla_cpu_experimental_onednn_custom_call=true"]
  assert os.environ["XLA_FLAGS"] == result
  monkeypatch.delenv("XLA_FLAGS")
  assert xla_flags.add_xla_flags(xla_flags.FAST_CPU_FLAGS) == xla_flags.FAST_CPU_FLAGS


@pytest.mark.parametrize("user_flags,expected", [
    ("--xla_force_host_platform_device_count=2", "onednn"),
    ("--xla_cpu_experimental_onednn_custom_call=false", "no-onednn"),
])
def test_flags_reach_the_cpu_compiler(user_flags, expected):
  assert _probe(user_flags) == expected
