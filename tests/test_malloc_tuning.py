"""mssar_jax.malloc_tuning: the tunables are added once (keeping the user's), the re-run happens
only where it applies, and it really stops XLA:CPU's step buffers from being faulted in anew."""

import os
import subprocess
import sys
import textwrap

from mssar_jax import malloc_tuning

_CHILD = textwrap.dedent("""
    import resource
    from mssar_jax import malloc_tuning
    malloc_tuning.reexec_with_tuned_malloc()
    import jax, jax.numpy as jnp
    x = jnp.ones((1 << 24,), jnp.float32)  # 64 MB; each call allocates temporaries like it
    f = jax.jit(lambda x: (jnp.cumsum(x) * jnp.cumsum(x[::-1])).sum())
    for _ in range(2):
      f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    print(malloc_tuning.active(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _run_child(**env):
  clean = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "MSSAR_MALLOC_TUNING")}
  out = subprocess.run([sys.executable, "-c", _CHILD], env={**clean, **env}, check=True,
                       capture_output=True, text=True).stdout.split()
  return out[0] == "True", int(out[1])


def test_environment_adds_the_tunables_once_and_keeps_the_users():
  env = malloc_tuning.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.cpu.x=1"})
  tunables = env["GLIBC_TUNABLES"].split(":")
  assert tunables[:2] == ["glibc.malloc.arena_max=2", "glibc.cpu.x=1"]  # the user's value wins
  assert "glibc.malloc.arena_max=1" not in tunables
  assert set(malloc_tuning.TUNABLES) - {"glibc.malloc.arena_max=1"} <= set(tunables)
  assert malloc_tuning.active(env) and not malloc_tuning.active({})
  assert malloc_tuning.environment(env)["GLIBC_TUNABLES"] == env["GLIBC_TUNABLES"]
  assert malloc_tuning.environment({})["GLIBC_TUNABLES"] == ":".join(malloc_tuning.TUNABLES)


def test_rerun_only_where_it_applies_and_then_no_page_faults_per_step():
  applies = (sys.platform.startswith("linux") and malloc_tuning._glibc_supports_tunables()
             and malloc_tuning._cpu_only_jax())
  active, faults = _run_child()
  off_active, off_faults = _run_child(MSSAR_MALLOC_TUNING="0")
  assert active == applies and not off_active
  assert off_faults > 16_000  # 64 MB of temporaries faulted in 4 KiB at a time, every call
  if applies:
    assert faults < 1_000, (faults, off_faults)
