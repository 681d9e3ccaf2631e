"""Run outputs in the workdir: ``metrics.jsonl``, TensorBoard events, ``config.json``.

``metrics.jsonl`` holds one JSON object per logged step, ``{"step": s, "<name>": value, ...}``
(train metrics averaged over the steps since the previous line, eval metrics over the whole
eval set). Only deterministic quantities go there; timings (img/s) go to TensorBoard and the
console, and to ``perf.jsonl``: ``{"step": s, "train_seconds": t, "images_per_second": r}``
at every logged step, where t is the training time of the whole run up to step s (summed over
resumed sessions; compilation and evaluations excluded), so the time to reach an accuracy can
be read after the run. Only process 0 writes; the other processes' writers do nothing.

On resume from step s the lines of steps after s (written before a crash, after the last
checkpoint) and any torn last line are dropped first (from both files): the resumed run writes
them again, so ``metrics.jsonl`` ends up equal to that of an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np


def _plain(value):
  value = np.asarray(value).item() if not isinstance(value, (int, float, str)) else value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class MetricsWriter:
  """Appends to ``metrics.jsonl`` and writes TensorBoard scalars (process 0 only)."""

  def __init__(self, workdir: str, *, resume_step: int = 0, enabled: bool = True):
    self._enabled = enabled
    self._tb = None
    if not enabled:
      return
    from flax.metrics import tensorboard  # pylint: disable=import-outside-toplevel
    path = os.path.join(workdir, "metrics.jsonl")
    _truncate_after(path, resume_step)
    self._jsonl = open(path, "a", encoding="utf-8")
    perf_path = os.path.join(workdir, "perf.jsonl")
    _truncate_after(perf_path, resume_step)
    earlier = _read_lines(perf_path)
    self.train_seconds_before = float(earlier[-1]["train_seconds"]) if earlier else 0.0
    self._perf = open(perf_path, "a", encoding="utf-8")
    self._tb = tensorboard.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, Any], *, train_seconds: float,
            images_per_second: float):
    """One line for ``metrics``, one for the timings (``train_seconds``: this session's)."""
    if not self._enabled:
      return
    record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    perf = {"step": int(step),
            "train_seconds": round(self.train_seconds_before + train_seconds, 3),
            "images_per_second": round(float(images_per_second), 2)}
    self._perf.write(json.dumps(perf) + "\n")
    self._perf.flush()
    extra = {"perf/images_per_second": images_per_second,
             "perf/train_seconds": perf["train_seconds"]}
    for name, value in {**metrics, **extra}.items():
      self._tb.scalar(name, float(np.asarray(value)), int(step))
    self._tb.flush()

  def close(self):
    if self._enabled:
      self._jsonl.close()
      self._perf.close()
      self._tb.close()


def _truncate_after(path: str, step: int) -> None:
  """Keeps the complete lines of ``path`` whose step is <= ``step`` (atomic rewrite)."""
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      if line.endswith("\n") and json.loads(line)["step"] <= step:
        kept.append(line)
    except (ValueError, KeyError, TypeError):
      pass
  if kept != lines:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)


def write_config(workdir: str, config) -> None:
  """Saves the resolved config as ``config.json`` (overwritten on resume)."""
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def _read_lines(path: str) -> list[dict[str, Any]]:
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def read_metrics(workdir: str, name: str = "metrics.jsonl") -> list[dict[str, Any]]:
  """The records of ``metrics.jsonl`` (or ``perf.jsonl``) of a workdir."""
  return _read_lines(os.path.join(workdir, name))
