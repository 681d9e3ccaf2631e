"""Run outputs in the workdir (local or gs://): ``config.json``, ``metrics.jsonl``,
``perf.jsonl`` and TensorBoard events.

``metrics.jsonl`` holds one JSON object per logged step, ``{"step": s, "<name>": value, ...}``
(train metrics averaged over the steps since the previous line, eval metrics over the whole
eval set). Only deterministic quantities go there. Timings go to ``perf.jsonl``:
``{"step": s, "train_seconds": t, "images_per_second": r}``, where t is the training time of
the whole run up to step s (summed over resumed sessions; compilation and evaluations
excluded), so the time to reach an accuracy can be read after the run; and to TensorBoard
with the metrics. Only process 0 writes; the other processes' writers do nothing.

On resume from step s the lines of steps after s (written before a crash, after the last
checkpoint) and any torn last line are dropped: the resumed run writes them again, so
``metrics.jsonl`` ends up equal to that of an uninterrupted run. Both files are rewritten
whole at each write (object stores such as GCS have no append), which for a few thousand
lines costs nothing beside a train step.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any, Mapping

from etils import epath
import numpy as np

METRICS, PERF, CONFIG = "metrics.jsonl", "perf.jsonl", "config.json"


def _plain(value):
  value = np.asarray(value).item() if not isinstance(value, (int, float, str)) else value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class JsonLines:
  """A JSONL file kept in memory and rewritten whole on every append."""

  def __init__(self, path: epath.Path, keep_until_step: int | None = None):
    self.path = path
    self.records = [r for r in read_jsonl(path)
                    if keep_until_step is None or r["step"] <= keep_until_step]
    if path.exists() and keep_until_step is not None:
      self._flush()

  def append(self, record: dict[str, Any]) -> None:
    self.records.append(record)
    self._flush()

  def _flush(self) -> None:
    text = "".join(json.dumps(r) + "\n" for r in self.records)
    write_text_atomic(self.path, text)


class MetricsWriter:
  """Writes ``metrics.jsonl``, ``perf.jsonl`` and TensorBoard scalars (process 0 only)."""

  def __init__(self, workdir, *, resume_step: int = 0, enabled: bool = True,
               tensorboard: bool = True):
    self._enabled = enabled
    self._tb = None
    if not enabled:
      return
    workdir = epath.Path(workdir)
    self._metrics = JsonLines(workdir / METRICS, resume_step)
    self._perf = JsonLines(workdir / PERF, resume_step)
    self.train_seconds_before = (float(self._perf.records[-1]["train_seconds"])
                                 if self._perf.records else 0.0)
    if tensorboard:
      from flax.metrics import tensorboard as tb  # pylint: disable=import-outside-toplevel  (optional: TensorFlow)
      self._tb = tb.SummaryWriter(str(workdir / "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, Any], *, train_seconds: float,
            images_per_second: float):
    """One line for ``metrics``, one for the timings (``train_seconds``: this session's)."""
    if not self._enabled:
      return
    self._metrics.append({"step": int(step), **{k: _plain(v) for k, v in metrics.items()}})
    perf = {"step": int(step),
            "train_seconds": round(self.train_seconds_before + train_seconds, 3),
            "images_per_second": round(float(images_per_second), 2)}
    self._perf.append(perf)
    if self._tb is not None:
      extra = {"perf/images_per_second": perf["images_per_second"],
               "perf/train_seconds": perf["train_seconds"]}
      for name, value in {**metrics, **extra}.items():
        self._tb.scalar(name, float(np.asarray(value)), int(step))
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def write_text_atomic(path: epath.Path, text: str) -> None:
  """Writes ``text`` so that a reader never sees a half-written file (a GCS object is
  replaced whole; locally: a temporary file, then a rename)."""
  if "://" in str(path):  # an object store replaces the object whole
    path.write_text(text)
    return
  tmp = path.parent / f".{path.name}.tmp"
  tmp.write_text(text)
  tmp.replace(path)


def write_config(workdir, config) -> None:
  """Saves the resolved config as ``config.json`` (overwritten on resume)."""
  write_text_atomic(epath.Path(workdir) / CONFIG,
                    config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def read_jsonl(path) -> list[dict[str, Any]]:
  """The complete records of a JSONL file ([] if it does not exist; a torn line is skipped)."""
  path = epath.Path(path)
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines(keepends=True):
    try:
      if line.endswith("\n"):
        records.append(json.loads(line))
    except ValueError:
      pass
  return records


def read_metrics(workdir, name: str = METRICS) -> list[dict[str, Any]]:
  """The records of ``metrics.jsonl`` (or ``perf.jsonl``) of a workdir."""
  return read_jsonl(epath.Path(workdir) / name)


def save_png(figure, out, dpi: int = 80) -> str:
  """Writes a matplotlib figure as a PNG to ``out`` (local or gs://); returns the path."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=dpi)
  path = epath.Path(out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buffer.getvalue())
  return str(path)
