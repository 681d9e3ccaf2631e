"""Paper-style overhead table: parameters and forward FLOPs per model and recalibration.

    python -m mssar_jax.summary                       # every model x none, se, ms_sar
    python -m mssar_jax.summary --model cifar_resnet56 --recalibration none,ms_sar

FLOPs come from XLA's cost analysis of the (unoptimised) inference forward pass for one image
at the model's input size: 2 FLOPs per multiply-add, padded taps excluded, so ResNet-50's
usual "4.1 GFLOPs" (multiply-adds) appear here as about 7.9 GFLOPs. Blocks are unrolled for
the count (XLA counts a scanned loop body once). Overheads are relative to 'none'.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np

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
    num_classes = 1000 if size == 224 else 10
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
      row = base if recalibration == "none" else measure(name, recalibration, **kwargs)
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


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="all", help="a model name, a comma list, or 'all'")
  parser.add_argument("--recalibration", default="none,se,ms_sar",
                      help="comma list of recalibrations (overheads are against 'none')")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="recalibration argument, e.g. --set scales='(2,4)' --set weighting=symmetric")
  args = parser.parse_args(argv)
  names = list_models() if args.model == "all" else args.model.split(",")
  kwargs = {}
  for item in args.set:
    if "=" not in item:
      parser.error(f"--set expects KEY=VALUE, got {item!r}")
    key, value = item.split("=", 1)
    kwargs[key] = _parse_value(value)
  try:
    rows = summarize(names, tuple(args.recalibration.split(",")), **kwargs)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(to_markdown(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
