"""Process set-up for XLA:CPU, before JAX starts: glibc malloc tunables and XLA flags.

``prepare()`` is the first thing ``train`` does. It imports nothing heavy, so it can run
before JAX (and can re-run the process) at no cost. Both parts concern CPU-only JAX installs;
on TPU / GPU hosts (an accelerator plugin is installed) it does nothing.

Malloc: XLA:CPU's step buffers reused, and on transparent huge pages.

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

glibc reads tunables when a process starts, so ``prepare()`` re-runs the same command line once
with ``$GLIBC_TUNABLES`` extended (``reexec_with_tuned_malloc``). It does so only on Linux with
glibc >= 2.35 and a CPU-only JAX install (on TPU / GPU hosts XLA's buffers live on the device,
and one malloc arena could slow a heavily threaded input pipeline); ``MSSAR_MALLOC_TUNING=0``
turns it off. Notebooks and other programs can set ``GLIBC_TUNABLES`` before Python starts
(``environment()``).

XLA flags: ``FAST_CPU_FLAGS`` route XLA:CPU's own convolutions (those the oneDNN FFI kernels
do not take) to oneDNN custom calls, measurably faster on CPU (docs/performance.md). A flag
already in ``$XLA_FLAGS`` wins: ``--xla_cpu_experimental_onednn_custom_call=false`` turns them
off. They concern only the CPU backend.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys

FAST_CPU_FLAGS = "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true"
TUNABLES = ("glibc.malloc.hugetlb=1", "glibc.malloc.mmap_max=0", "glibc.malloc.arena_max=1",
            "glibc.malloc.trim_threshold=1099511627776")
ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm_plugin")


def _glibc_supports_tunables() -> bool:
  libc, version = platform.libc_ver()
  if libc != "glibc" or not version:
    return False
  major, minor = (int(p) for p in version.split(".")[:2])
  return (major, minor) >= (2, 35)


def accelerator_plugins() -> list[str]:
  """The JAX accelerator plugins installed in this environment (TPU, CUDA, ROCm)."""
  return [p for p in ACCELERATOR_PLUGINS if importlib.util.find_spec(p) is not None]


def _cpu_only_jax() -> bool:
  return not accelerator_plugins()


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


def add_xla_flags(flags: str) -> str:
  """Appends ``flags`` to ``$XLA_FLAGS``, skipping any flag name already there.

  Takes effect only if JAX has not created its CPU backend yet (its first computation does).
  Returns the new ``$XLA_FLAGS``.
  """
  current = os.environ.get("XLA_FLAGS", "")
  names = {f.split("=")[0] for f in current.split()}
  extra = [f for f in flags.split() if f.split("=")[0] not in names]
  os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
  return os.environ["XLA_FLAGS"]


def prepare() -> None:
  """Malloc tunables (may re-run the process) and XLA:CPU flags, on CPU-only installs."""
  if not _cpu_only_jax():
    return
  reexec_with_tuned_malloc()
  add_xla_flags(FAST_CPU_FLAGS)
