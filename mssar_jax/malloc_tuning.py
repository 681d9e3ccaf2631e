"""glibc malloc settings for XLA:CPU's step buffers: reused, and on transparent huge pages.

XLA:CPU allocates each execution's temporary buffers afresh: one block of about 500 MB for a
cifar_resnet56 train step at batch 128. glibc serves a block that large with ``mmap`` and
returns it with ``munmap``, so the kernel faults the next step's block in again, 4 KiB at a
time and zeroed: 135,000 page faults and ~240 ms of system time per step on the 2-core test
machine, a quarter of the step's CPU time (README, "Performance"). ``TUNABLES`` tell glibc
(>= 2.35) to serve every block from its main heap (``mmap_max=0``, one arena), to keep freed
memory instead of trimming it, and to back its heap with transparent huge pages where the
kernel allows them (``hugetlb=1``, for 'madvise' mode): after the first steps no page faults
at all, and the cifar_resnet56 step ~25% faster. Same results; the cost is that the process
keeps its peak memory until it exits.

glibc reads tunables when a process starts, so ``train.py`` and ``python -m mssar_jax.bench``
call ``reexec_with_tuned_malloc()`` first: it re-runs the same command line once with
``$GLIBC_TUNABLES`` extended. It does so only on Linux with glibc >= 2.35 and a CPU-only JAX
install (on TPU / GPU hosts XLA's buffers live on the device, and one malloc arena could slow
a heavily threaded input pipeline); ``MSSAR_MALLOC_TUNING=0`` turns it off. Notebooks and
other programs can set ``GLIBC_TUNABLES`` before Python starts (``environment()``).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys

TUNABLES = ("glibc.malloc.hugetlb=1", "glibc.malloc.mmap_max=0", "glibc.malloc.arena_max=1",
            "glibc.malloc.trim_threshold=1099511627776")
_ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm_plugin")


def _glibc_supports_tunables() -> bool:
  libc, version = platform.libc_ver()
  if libc != "glibc" or not version:
    return False
  major, minor = (int(p) for p in version.split(".")[:2])
  return (major, minor) >= (2, 35)


def _cpu_only_jax() -> bool:
  return not any(importlib.util.find_spec(p) is not None for p in _ACCELERATOR_PLUGINS)


def active(env=None) -> bool:
  """Whether ``$GLIBC_TUNABLES`` (of ``env``, default this process) sets every tunable that
  ``TUNABLES`` sets (to these values, or to the user's own)."""
  current = (os.environ if env is None else env).get("GLIBC_TUNABLES", "").split(":")
  names = {t.split("=")[0] for t in current}
  return all(t.split("=")[0] in names for t in TUNABLES)


def wanted() -> bool:
  """Whether ``reexec_with_tuned_malloc()`` would re-run this process (see module doc)."""
  return (sys.platform.startswith("linux") and os.environ.get("MSSAR_MALLOC_TUNING", "1") != "0"
          and not active() and _glibc_supports_tunables() and _cpu_only_jax())


def environment(env=None) -> dict:
  """A copy of ``env`` (default ``os.environ``) with ``TUNABLES`` in ``$GLIBC_TUNABLES``
  (a tunable the user set keeps the user's value)."""
  env = dict(os.environ if env is None else env)
  current = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
  names = {t.split("=")[0] for t in current}
  env["GLIBC_TUNABLES"] = ":".join(
      [*current, *(t for t in TUNABLES if t.split("=")[0] not in names)])
  return env


def reexec_with_tuned_malloc() -> None:
  """Re-runs this process's command line with ``TUNABLES`` set, if ``wanted()``; else returns.

  Call it first thing in a command-line entry point, before anything worth keeping has run.
  """
  if not wanted() or not getattr(sys, "orig_argv", None):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, environment())
