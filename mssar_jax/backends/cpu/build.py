"""Compiles this package's C++ XLA FFI handlers into shared libraries, once per machine.

Each library is built on first use with the system C++ compiler (``$CXX``, else g++ / c++)
against jaxlib's FFI headers and cached under ``$MSSAR_JAX_CACHE`` (default
``~/.cache/mssar_jax``)/native, named by a hash of everything that shapes the binary: the
source, the compiler flags, jax's version, the FFI headers' path and, for ``-march=native``
builds, the CPU's model and feature flags (so a cache shared between different machines
never hands one a binary built for the other).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Sequence

import jax


def cache_dir() -> Path:
  root = os.environ.get("MSSAR_JAX_CACHE") or Path.home() / ".cache" / "mssar_jax"
  return Path(root) / "native"


def _cpu_fingerprint() -> str:
  """The CPU's model name and feature flags (Linux), else what ``platform`` knows."""
  keep = ("model name", "flags", "Features", "CPU implementer", "CPU part")
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      lines = sorted({line.strip() for line in f if line.startswith(keep)})
    return "\n".join(lines)
  except OSError:
    return platform.processor() + platform.machine()


def build(source: Path, stem: str, flags: Sequence[str] = (), link: Sequence[str] = (),
          extra_digest: Sequence[str] = ()) -> Path:
  """Compiles ``source`` into ``<cache>/<stem>_<hash>.so`` unless it exists; returns the path.

  Raises RuntimeError (with the compiler's last words) if there is no compiler or it fails.
  """
  compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
  if compiler is None:
    raise RuntimeError("no C++ compiler found (install g++ or set $CXX)")
  ffi_include = jax.ffi.include_dir()
  flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-w", *flags, f"-I{ffi_include}"]
  digest = hashlib.sha256()
  parts = [source.read_bytes(), " ".join(flags + list(link)).encode(), jax.__version__.encode(),
           *(p.encode() for p in extra_digest)]
  if "-march=native" in flags:
    parts.append(_cpu_fingerprint().encode())
  for part in parts:
    digest.update(part)
  target = cache_dir() / f"{stem}_{digest.hexdigest()[:16]}.so"
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    out = Path(tmp) / target.name
    result = subprocess.run([compiler, *flags, str(source), "-o", str(out), *link],
                            capture_output=True, text=True)
    if result.returncode != 0:
      raise RuntimeError(f"compiling {source.name} failed: {result.stderr.strip()[-500:]}")
    os.replace(out, target)  # atomic: concurrent builders (pytest -n) each write their own tmp
  return target


class FfiLibrary:
  """A library of XLA FFI handlers, built and registered with XLA on first use.

  ``build_fn()`` returns the .so path (or raises RuntimeError); ``targets`` maps the names
  the handlers are registered under to their C symbols.
  """

  def __init__(self, build_fn: Callable[[], Path], targets: Mapping[str, str]):
    self._build_fn, self._targets = build_fn, dict(targets)
    self.unavailable_reason: str | None = None

  @functools.cache  # pylint: disable=method-cache-max-size-none
  def available(self) -> bool:
    """Whether the handlers are registered (builds and loads the library on first call)."""
    try:
      library = ctypes.cdll.LoadLibrary(str(self._build_fn()))
      for name, symbol in self._targets.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)),
                                    platform="cpu")
    except (RuntimeError, OSError, AttributeError) as e:
      self.unavailable_reason = str(e)
      return False
    return True
