r"""Training curves of one or several runs: train loss, test accuracy and lr against steps.

    python -m mssar_jax.plot runs/none runs/se runs/ms_sar                # -> curves.png
    python -m mssar_jax.plot runs/* --out docs/curves.png --color_by recalibration

Reads each workdir's ``metrics.jsonl`` (and ``config.json`` for the legend) and draws three
panels into one PNG: ``train/loss`` (mean over each log interval), ``eval/accuracy`` (test
top-1, at every evaluation) and ``train/learning_rate`` (log scale). The legend names each
run by ``<model> + <recalibration>`` plus the config keys in which the runs differ (e.g.
``seed=1``, ``num_train_steps=600``); runs whose labels would still coincide get their
directory name. ``--color_by KEY`` gives the runs that share the config value of KEY one
colour (and a line style each), e.g. variants x seeds.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from mssar_jax.errors import ConfigError

PANELS = (("train/loss", "train loss", False),
          ("eval/accuracy", "test accuracy", False),
          ("train/learning_rate", "learning rate", True))
# Keys that differ between runs without describing them (paths, bookkeeping).
_IGNORED = {"data_dir", "async_checkpointing", "keep_checkpoints", "log_every_steps",
            "eval_every_steps", "checkpoint_every_steps", "prefetch", "cache",
            "eval_batch_size", "shuffle_buffer"}
_STYLES = ("-", "--", ":", "-.")


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
  return out


def read_run(workdir: str) -> dict[str, Any]:
  """{'workdir', 'config' (flat dict, {} if config.json is missing), 'records'}."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise ConfigError(f"{path} not found; pass training workdirs (they hold metrics.jsonl).")
  records = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except ValueError:
        continue  # a torn last line of a run still being written
  config = {}
  config_path = os.path.join(workdir, "config.json")
  if os.path.isfile(config_path):
    with open(config_path, encoding="utf-8") as f:
      config = _flat(json.load(f))
  return {"workdir": workdir, "config": config, "records": records}


def series(records: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of the records holding a finite ``key``."""
  steps, values = [], []
  for r in records:
    value = r.get(key)
    if isinstance(value, (int, float)) and value == value:
      steps.append(int(r["step"]))
      values.append(float(value))
  return steps, values


def _short(value) -> str:
  if isinstance(value, float):
    return f"{value:g}"
  if isinstance(value, tuple):
    return "(" + ",".join(_short(v) for v in value) + ")"
  return str(value)


def _explained_by_recalibration(key: str, runs: Sequence[dict]) -> bool:
  """A recalibration argument that is constant among the runs of each recalibration (e.g.
  ``scales`` of ms_sar runs against none runs): the recalibration name already says it."""
  if not key.startswith("recalibration_kwargs."):
    return False
  groups: dict[str, set] = {}
  for r in runs:
    groups.setdefault(repr(r["config"].get("recalibration")),
                      set()).add(repr(r["config"].get(key)))
  return all(len(values) == 1 for values in groups.values())


def labels(runs: Sequence[dict], max_keys: int = 3) -> list[str]:
  """Legend labels: model + recalibration, plus the config keys in which the runs differ
  (``seed`` first, at most ``max_keys``)."""
  keys = sorted({k for r in runs for k in r["config"]}, key=lambda k: (k != "seed", k))
  differing = [k for k in keys if k not in _IGNORED and k not in ("model", "recalibration")
               and len({repr(r["config"].get(k)) for r in runs}) > 1
               and not _explained_by_recalibration(k, runs)]
  out = []
  for r in runs:
    c = r["config"]
    base = (f"{c.get('model', '?')} + {c.get('recalibration', '?')}" if c
            else os.path.basename(os.path.normpath(r["workdir"])))
    extra = [f"{k.split('.')[-1]}={_short(c.get(k))}" for k in differing[:max_keys]]
    out.append(", ".join([base, *extra]))
  repeated = {label for label in out if out.count(label) > 1}
  return [f"{label} ({os.path.basename(os.path.normpath(r['workdir']))})"
          if label in repeated else label for label, r in zip(out, runs)]


def plot_runs(workdirs: Sequence[str], out: str, *, color_by: str | None = None,
              title: str | None = None, dpi: int = 100) -> str:
  """Draws the three panels for ``workdirs`` into ``out`` (PNG); returns ``out``."""
  if not workdirs:
    raise ConfigError("no workdirs given; pass one or more training workdirs.")
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  import matplotlib.ticker  # pylint: disable=import-outside-toplevel

  runs = [read_run(w) for w in workdirs]
  names = labels(runs)
  palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  styles = []
  if color_by:
    groups: dict[str, int] = {}
    seen: dict[str, int] = {}
    for r in runs:
      g = repr(r["config"].get(color_by))
      groups.setdefault(g, len(groups))
      styles.append((palette[groups[g] % len(palette)], _STYLES[seen.get(g, 0) % len(_STYLES)]))
      seen[g] = seen.get(g, 0) + 1
  else:
    styles = [(palette[i % len(palette)], _STYLES[(i // len(palette)) % len(_STYLES)])
              for i in range(len(runs))]

  fig, axes = plt.subplots(1, len(PANELS), figsize=(5.0 * len(PANELS), 4.2))
  for ax, (key, name, log) in zip(axes, PANELS):
    for run, label, (color, style) in zip(runs, names, styles):
      steps, values = series(run["records"], key)
      if not steps:
        continue
      marker = "o" if key.startswith("eval/") or len(steps) < 3 else None
      ax.plot(steps, values, style, color=color, marker=marker, markersize=3, linewidth=1.3,
              label=label)
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if log:
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
  handles, texts = axes[0].get_legend_handles_labels()
  for ax in axes[1:]:
    for h, t in zip(*ax.get_legend_handles_labels()):
      if t not in texts:
        handles.append(h)
        texts.append(t)
  longest = max((len(t) for t in texts), default=1)
  ncol = max(1, min(len(texts), int(fig.get_figwidth() / (0.07 * longest + 0.8))))
  rows = -(-len(texts) // ncol) if texts else 0
  fig.legend(handles, texts, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout(rect=(0, 0.01 + 0.05 * rows, 1, 0.95 if title else 1))
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=dpi)
  plt.close(fig)
  return out


def main(argv=None) -> int:
  import argparse  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(
      prog="python -m mssar_jax.plot",
      description="Train loss, test accuracy and lr against steps for one or several runs.")
  parser.add_argument("workdirs", nargs="+", metavar="DIR", help="training workdirs")
  parser.add_argument("--out", default="curves.png", help="PNG path (default: curves.png)")
  parser.add_argument("--color_by", default=None,
                      help="config key whose runs share a colour, e.g. recalibration")
  parser.add_argument("--title", default=None)
  parser.add_argument("--dpi", type=int, default=100)
  args = parser.parse_args(argv)
  try:
    path = plot_runs(args.workdirs, args.out, color_by=args.color_by, title=args.title,
                     dpi=args.dpi)
  except ConfigError as e:
    print(f"plot: {e}", file=sys.stderr)
    return 1
  print(path)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
