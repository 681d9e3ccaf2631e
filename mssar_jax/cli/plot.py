r"""Training curves of one or several runs: train loss, test accuracy and lr against steps.

    mssar-plot runs/none runs/se runs/ms_sar                # -> curves.png
    mssar-plot runs/* --out docs/curves.png --color_by recalibration

Reads each workdir's ``metrics.jsonl`` (and ``config.json`` for the legend) and draws three
panels into one PNG: ``train/loss`` (mean over each log interval), ``eval/accuracy`` (test
top-1, at every evaluation) and ``train/learning_rate`` (log scale). The legend names each
run by ``<model> + <recalibration>`` plus the config keys in which the runs differ (e.g.
``seed=1``, ``num_train_steps=600``); runs whose labels would still coincide get their
directory name. ``--color_by KEY`` gives the runs that share the config value of KEY one
colour (and a line style each), e.g. variants x seeds. Workdirs and ``--out`` may be gs://.
Also ``python -m mssar_jax.cli.plot``.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Sequence

from absl import app
from absl import flags
from etils import epath
from matplotlib import rcParams
from matplotlib import ticker
from matplotlib.figure import Figure

from mssar_jax.errors import ConfigError
from mssar_jax.storage import metrics as metrics_lib

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


def read_run(workdir) -> dict[str, Any]:
  """{'workdir', 'config' (flat dict, {} if config.json is missing), 'records'}."""
  path = epath.Path(workdir)
  if not (path / metrics_lib.METRICS).is_file():
    raise ConfigError(f"{path / metrics_lib.METRICS} not found; pass training workdirs (they "
                      "hold metrics.jsonl).")
  config_path = path / metrics_lib.CONFIG
  config = _flat(json.loads(config_path.read_text())) if config_path.is_file() else {}
  return {"workdir": str(workdir), "config": config,
          "records": metrics_lib.read_metrics(path)}


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
            else epath.Path(r["workdir"]).name)
    extra = [f"{k.split('.')[-1]}={_short(c.get(k))}" for k in differing[:max_keys]]
    out.append(", ".join([base, *extra]))
  repeated = {label for label in out if out.count(label) > 1}
  return [f"{label} ({epath.Path(r['workdir']).name})"
          if label in repeated else label for label, r in zip(out, runs)]


def plot_runs(workdirs: Sequence[str], out: str, *, color_by: str | None = None,
              title: str | None = None, dpi: int = 100) -> str:
  """Draws the three panels for ``workdirs`` into ``out`` (PNG); returns ``out``."""
  if not workdirs:
    raise ConfigError("no workdirs given; pass one or more training workdirs.")
  runs = [read_run(w) for w in workdirs]
  names = labels(runs)
  palette = rcParams["axes.prop_cycle"].by_key()["color"]
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

  fig = Figure(figsize=(5.0 * len(PANELS), 4.2))
  axes = fig.subplots(1, len(PANELS))
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
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
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
  return metrics_lib.save_png(fig, out, dpi)


def define_flags() -> None:
  """The command's flags (defined only when it runs, so the module imports anywhere)."""
  flags.DEFINE_string("out", "curves.png", "PNG path.")
  flags.DEFINE_string("color_by", None, "Config key whose runs share a colour, e.g. "
                      "recalibration.")
  flags.DEFINE_string("title", None, "Figure title.")
  flags.DEFINE_integer("dpi", 100, "Resolution of the PNG.")


def main(argv) -> None:
  f = flags.FLAGS
  try:
    path = plot_runs(argv[1:], f.out, color_by=f.color_by, title=f.title, dpi=f.dpi)
  except ConfigError as e:
    sys.exit(f"plot: {e}")
  print(path)


if __name__ == "__main__":
  define_flags()
  app.run(main)
