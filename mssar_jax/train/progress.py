"""Console progress for process 0: a bar with step, loss, img/s and ETA, and a final summary.

Throughput is measured from the end of the first step of this run (excluding compilation)
and excluding evaluations and checkpoint saves: img/s = global_batch * (steps since then) /
training seconds, ETA = remaining steps / steps per second (evaluations not included).
"""

from __future__ import annotations

import datetime
import sys
import time


def _duration(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def _short(name: str) -> str:
  """'train/loss' -> 'loss', 'train/learning_rate' -> 'lr', 'eval/accuracy' -> 'eval_acc'."""
  name = name.replace("train/", "").replace("eval/", "eval_").replace("learning_rate", "lr")
  return name.replace("accuracy", "acc")


class Progress:
  """Prints one progress line per call to ``update``; silent when not ``enabled``."""

  def __init__(self, *, total_steps: int, start_step: int, global_batch: int,
               enabled: bool = True, width: int = 24, stream=None):
    self.total_steps = total_steps
    self.start_step = start_step
    self.global_batch = global_batch
    self.enabled = enabled
    self.width = width
    self.stream = stream or sys.stdout
    self.started = time.time()
    self._t0 = None          # time after the first step of this run
    self._s0 = start_step
    self._excluded = 0.0     # seconds spent outside training (evaluation) since _t0

  def first_step_done(self, step: int) -> None:
    self._t0, self._s0 = time.time(), step

  def exclude(self, seconds: float) -> None:
    """Removes ``seconds`` (an evaluation, a checkpoint save) from the training time."""
    if self._t0 is not None:
      self._excluded += seconds

  def train_seconds(self, step: int) -> float:
    """Training seconds of this session up to ``step``: since the end of its first step
    (compilation), evaluations and checkpoint saves excluded."""
    if self._t0 is None or step <= self._s0:
      return 0.0
    return time.time() - self._t0 - self._excluded

  def images_per_second(self, step: int) -> float:
    if self._t0 is None or step <= self._s0:
      return 0.0
    seconds = time.time() - self._t0 - self._excluded
    return self.global_batch * (step - self._s0) / max(seconds, 1e-9)

  def eta_seconds(self, step: int) -> float:
    rate = self.images_per_second(step) / self.global_batch
    return (self.total_steps - step) / rate if rate > 0 else float("nan")

  def print(self, text: str) -> None:
    if self.enabled:
      print(text, file=self.stream, flush=True)

  def update(self, step: int, metrics: dict) -> None:
    frac = step / max(self.total_steps, 1)
    filled = int(round(frac * self.width))
    bar = "#" * filled + "." * (self.width - filled)
    shown = "  ".join(f"{_short(k)} {v:.4g}" for k, v in metrics.items())
    eta = self.eta_seconds(step)
    eta_text = _duration(eta) if eta == eta else "?"
    self.print(f"[{bar}] {step}/{self.total_steps} ({100 * frac:.0f}%)  {shown}  "
               f"{self.images_per_second(step):.0f} img/s  ETA {eta_text}")

  def summary(self, step: int, eval_metrics: dict, workdir: str) -> None:
    shown = "  ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items())
    self.print(f"done: step {step}/{self.total_steps} in {_duration(time.time() - self.started)} "
               f"({self.images_per_second(step):.0f} img/s)  {shown}  outputs in {workdir}")
