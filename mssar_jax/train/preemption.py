"""Stop training cleanly on SIGTERM / SIGINT: finish the step, checkpoint it, exit.

Single process: a handler for SIGTERM and SIGINT (installed only while training, and only from
the main thread) records the signal; ``should_stop(step)`` is then true after the step that is
running, and the trainer saves that step and returns. A second signal while the checkpoint is
being written is ignored, so the save completes.

Several processes (``jax.process_count() > 1``, e.g. a multi-host TPU slice): hosts may get the
notice at different steps, so they must agree on the step to stop at. JAX's preemption service
(enabled by ``jax.distributed.initialize``) catches SIGTERM on every host and
``multihost_utils.reached_preemption_sync_point(step)`` is true on all hosts at the same step;
we use it and install no handler of our own. SIGINT then keeps its default (KeyboardInterrupt).
Without that service (``synchronised()`` is False; the trainer's first line warns) a signal
is not caught: hosts stopping at different steps could not write one checkpoint.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


def synchronised() -> bool:
  """Whether the processes can agree on a stop step (JAX's distributed service is running)."""
  return jax.distributed.is_initialized()


class PreemptionWatcher:
  """Context manager; ``should_stop(step)`` after each train step."""

  def __init__(self, process_count: int):
    self._multi = process_count > 1
    self._sync = self._multi and synchronised()
    self._received: int | None = None
    self._previous: dict[int, object] = {}

  @property
  def signal_name(self) -> str:
    return signal.Signals(self._received).name if self._received else "preemption notice"

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self._received = self._received or signum

  def __enter__(self) -> "PreemptionWatcher":
    if not self._multi and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def should_stop(self, step: int) -> bool:
    """True once a stop was requested (on every process at the same ``step``)."""
    if self._sync:
      if multihost_utils.reached_preemption_sync_point(step):
        self._received = self._received or signal.SIGTERM
        return True
      return False
    return self._received is not None
