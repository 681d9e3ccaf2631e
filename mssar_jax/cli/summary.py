"""Paper-style overhead table: parameters and forward FLOPs per model and recalibration.

    mssar-summary                       # every model x none, se, ms_sar
    mssar-summary --model cifar_resnet56 --recalibration none,ms_sar
    mssar-summary --model cifar_resnet56 --config.scales='(2,4)' --config.weighting=symmetric

FLOPs come from XLA's cost analysis of the (unoptimised) inference forward pass for one image
at the model's input size: 2 FLOPs per multiply-add, padded taps excluded, so ResNet-50's
usual "4.1 GFLOPs" (multiply-adds) appear here as about 7.9 GFLOPs. Blocks are unrolled for
the count (XLA counts a scanned loop body once). Overheads are relative to 'none'.
``--config.<argument>=<value>`` sets a recalibration argument. Also
``python -m mssar_jax.cli.summary``.
"""

from __future__ import annotations

import dataclasses
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from ml_collections import config_dict
from ml_collections import config_flags

from mssar_jax import datasets
from mssar_jax import recalibration as recal_lib
from mssar_jax.errors import ConfigError
from mssar_jax.models import get_model, input_size, list_models, model_arguments


@dataclasses.dataclass
class Row:
  model: str
  recalibration: str
  params: int
  flops: float
  params_overhead: float = 0.0   # relative to 'none'
  flops_overhead: float = 0.0


def measure(name: str, recalibration: str = "none", num_classes: int | None = None,
            **kwargs) -> Row:
  """Trainable parameters and forward FLOPs (one image) of one configuration."""
  size = input_size(name)
  if num_classes is None:
    num_classes = datasets.get("imagenet2012" if size == 224 else "cifar10").num_classes
  if "scan_blocks" in model_arguments(name):
    kwargs.setdefault("scan_blocks", False)
  model = get_model(name, num_classes=num_classes, recalibration=recalibration, **kwargs)
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables["params"]))
  lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, images)
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return Row(name, recalibration, params, float(cost["flops"]))


def summarize(names, recalibrations=("none", "se", "ms_sar"), **kwargs) -> list[Row]:
  """Rows for every (model, recalibration), with overheads relative to 'none'."""
  rows = []
  for name in names:
    base = measure(name, "none")
    for recalibration in recalibrations:
      accepted = recal_lib.recalibration_arguments(recalibration)
      row = base if recalibration == "none" else measure(
          name, recalibration, **{k: v for k, v in kwargs.items() if k in accepted})
      row = dataclasses.replace(row, params_overhead=row.params / base.params - 1,
                                flops_overhead=row.flops / base.flops - 1)
      rows.append(row)
  return rows


def to_markdown(rows: list[Row]) -> str:
  lines = ["| model | recalibration | params | +params vs none | GFLOPs (fwd, 1 image) | +FLOPs vs none |",
           "|---|---|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r.model} | {r.recalibration} | {r.params:,} | {100 * r.params_overhead:+.2f}% "
                 f"| {r.flops / 1e9:.3f} | {100 * r.flops_overhead:+.2f}% |")
  return "\n".join(lines)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(recal_lib.MultiScaleSAR)
             if f.name in recal_lib.recalibration_arguments("ms_sar")}


def define_flags() -> None:
  """The command's flags (defined only when it runs, so the module imports anywhere)."""
  flags.DEFINE_string("model", "all", "A model name, a comma list, or 'all'.")
  flags.DEFINE_string("recalibration", "none,se,ms_sar",
                      "Comma list of recalibrations (overheads against none).")
  config_flags.DEFINE_config_dict(
      "config", config_dict.ConfigDict(_DEFAULTS),
      "Recalibration arguments, e.g. --config.scales='(2,4)' (each goes to the "
      "recalibrations that take it).")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  names = list_models() if f.model == "all" else f.model.split(",")
  changed = {k: v for k, v in f.config.to_dict().items() if v != _DEFAULTS[k]}
  try:
    rows = summarize(names, tuple(f.recalibration.split(",")), **changed)
  except ConfigError as e:
    sys.exit(f"summary: {e}")
  print(to_markdown(rows))


if __name__ == "__main__":
  define_flags()
  app.run(main)
