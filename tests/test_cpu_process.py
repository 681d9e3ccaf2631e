"""mssar_jax.cpu_process. Malloc: the tunables are added once (keeping the user's), the re-run
happens only where it applies, and it really stops XLA:CPU's step buffers from being faulted in
anew. XLA flags: appended without overriding the user's, and they reach XLA."""

import os
import subprocess
import sys
import textwrap

import pytest

from mssar_jax import cpu_process

_CHILD = textwrap.dedent("""
    import resource
    from mssar_jax import cpu_process
    cpu_process.reexec_with_tuned_malloc()
    import jax, jax.numpy as jnp
    x = jnp.ones((1 << 24,), jnp.float32)  # 64 MB; each call allocates temporaries like it
    f = jax.jit(lambda x: (jnp.cumsum(x) * jnp.cumsum(x[::-1])).sum())
    for _ in range(2):
      f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    print(cpu_process.active(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _run_child(**env):
  clean = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "MSSAR_MALLOC_TUNING")}
  out = subprocess.run([sys.executable, "-c", _CHILD], env={**clean, **env}, check=True,
                       capture_output=True, text=True).stdout.split()
  return out[0] == "True", int(out[1])


def test_environment_adds_the_tunables_once_and_keeps_the_users():
  env = cpu_process.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.cpu.x=1"})
  tunables = env["GLIBC_TUNABLES"].split(":")
  assert tunables[:2] == ["glibc.malloc.arena_max=2", "glibc.cpu.x=1"]  # the user's value wins
  assert "glibc.malloc.arena_max=1" not in tunables
  assert set(cpu_process.TUNABLES) - {"glibc.malloc.arena_max=1"} <= set(tunables)
  assert cpu_process.active(env) and not cpu_process.active({})
  assert cpu_process.environment(env)["GLIBC_TUNABLES"] == env["GLIBC_TUNABLES"]
  assert cpu_process.environment({})["GLIBC_TUNABLES"] == ":".join(cpu_process.TUNABLES)


def test_rerun_only_where_it_applies_and_then_no_page_faults_per_step():
  applies = (sys.platform.startswith("linux") and cpu_process._glibc_supports_tunables()
             and cpu_process._cpu_only_jax())
  active, faults = _run_child()
  off_active, off_faults = _run_child(MSSAR_MALLOC_TUNING="0")
  assert active == applies and not off_active
  assert off_faults > 16_000  # 64 MB of temporaries faulted in 4 KiB at a time, every call
  if applies:
    assert faults < 1_000, (faults, off_faults)

# Compiles one convolution in a fresh process (XLA flags are read when the CPU backend starts)
# after doing what train.py does first, and prints whether XLA lowered it to oneDNN.
_PROBE = """
from mssar_jax import cpu_process
cpu_process.add_xla_flags(cpu_process.FAST_CPU_FLAGS)
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
  result = cpu_process.add_xla_flags(cpu_process.FAST_CPU_FLAGS)
  assert result.split() == ["--xla_force_host_platform_device_count=8", "--xla_cpu_use_onednn=false",
                            "--xla_cpu_experimental_onednn_custom_call=true"]
  assert os.environ["XLA_FLAGS"] == result
  monkeypatch.delenv("XLA_FLAGS")
  assert cpu_process.add_xla_flags(cpu_process.FAST_CPU_FLAGS) == cpu_process.FAST_CPU_FLAGS


@pytest.mark.parametrize("user_flags,expected", [
    ("--xla_force_host_platform_device_count=2", "onednn"),
    ("--xla_cpu_experimental_onednn_custom_call=false", "no-onednn"),
])
def test_flags_reach_the_cpu_compiler(user_flags, expected):
  assert _probe(user_flags) == expected
