"""Checkpoints with orbax (every orbax call of the project lives here).

Layout: ``<workdir>/checkpoints/<step>/{state, meta}``; ``state`` is the train state pytree
(saved with StandardSave, restored onto the shardings of an abstract target), ``meta`` a small
JSON dict describing the run (model, dataset, ...) so a resumed run can check it matches.
Only the newest ``keep`` checkpoints are preserved (orbax ``LatestN`` preservation policy).
Saves are asynchronous by default: device arrays are copied to host before ``save`` returns,
so the caller may donate the state to the next step; ``close`` waits for pending writes.

Crash safety: orbax writes a step into a temporary directory and renames it when complete, so
a process killed mid-save leaves no half-written step (the temporary directory is ignored).
``restore_latest`` additionally survives a committed step that was damaged afterwards
(truncated or missing files): it reports the step, moves it to ``<workdir>/corrupt_checkpoints/``
(nothing is deleted) and falls back to the previous step.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

from absl import logging
import jax

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from mssar_jax.errors import ConfigError


class Checkpointer:
  """Save / restore the train state of one workdir."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    self._options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.LatestN(n=keep),
        enable_async_checkpointing=async_save,
        create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=self._options)

  def latest_step(self) -> int | None:
    """The newest committed checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Saves ``state`` (a pytree of jax arrays) and ``meta`` (JSON) as checkpoint ``step``."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def restore_latest(self, abstract_state: Any, meta: dict[str, Any]) -> tuple[int, Any]:
    """(step, state) of the newest readable checkpoint, or (0, None) if there is none.

    A checkpoint that cannot be read is reported (one warning line), moved aside to
    ``<workdir>/corrupt_checkpoints/<step>-<time>`` and the previous one is tried. A readable
    checkpoint of a different run raises ConfigError and nothing is moved.
    """
    damaged: list[int] = []
    found, state = 0, None
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state = self.restore(step, abstract_state, meta)
      except ConfigError:
        raise
      except Exception as e:  # pylint: disable=broad-exception-caught
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        logging.warning("checkpoint %d in %s is unreadable (%s: %s); falling back to the "
                        "previous one", step, self.directory, type(e).__name__, first)
        damaged.append(step)
        continue
      found = step
      break
    if damaged:
      self._quarantine(damaged)
    return found, state

  def _quarantine(self, steps: list[int]) -> None:
    """Moves the damaged ``steps`` out of the checkpoint directory (process 0 moves)."""
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices("mssar_jax: checkpoints read")
    if jax.process_index() == 0:
      target = os.path.join(self.workdir, "corrupt_checkpoints")
      os.makedirs(target, exist_ok=True)
      for step in steps:
        dest = os.path.join(target, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(os.path.join(self.directory, str(step)), dest)
        logging.warning("moved the unreadable checkpoint %d to %s", step, dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices("mssar_jax: damaged checkpoints moved")
    self._manager.close()
    self._manager = ocp.CheckpointManager(self.directory, options=self._options)

  def restore(self, step: int, abstract_state: Any, meta: dict[str, Any]) -> Any:
    """Restores checkpoint ``step`` onto the shapes/shardings of ``abstract_state``.

    Raises ConfigError if the checkpoint's ``meta`` disagrees with ``meta`` (another model or
    dataset in the same workdir).
    """
    saved = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    saved_meta = dict(saved["meta"] or {})
    diff = {k: (saved_meta.get(k), v) for k, v in meta.items() if saved_meta.get(k) != v}
    if diff:
      described = "; ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
      raise ConfigError(f"the workdir {os.path.dirname(self.directory)} holds a checkpoint of a "
                        f"different run ({described}); use a new --workdir or the same config.")
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending writes and releases the manager (safe to call twice)."""
    if self._manager is not None:
      self._manager.wait_until_finished()
      self._manager.close()
      self._manager = None
