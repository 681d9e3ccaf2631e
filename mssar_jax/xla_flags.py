"""XLA:CPU options that ``train.py`` and ``python -m mssar_jax.bench`` start JAX with.

``FAST_CPU_FLAGS`` route XLA:CPU convolutions to oneDNN through custom calls: about 8% less
time per cifar_resnet20 / resnet56 train step on the 2-core test machine (README,
"Performance"); jaxlib 0.10.2 and 0.12 both know them. They only concern the CPU backend, so
TPU and GPU runs are unaffected. A flag the user already put in ``$XLA_FLAGS`` wins:
``XLA_FLAGS=--xla_cpu_experimental_onednn_custom_call=false`` turns the oneDNN convolutions
off (that flag alone decides whether XLA:CPU rewrites convolutions to oneDNN custom calls).
"""

from __future__ import annotations

import os

FAST_CPU_FLAGS = "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true"


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
