"""Checkpoints with orbax (every orbax call of the project lives here).

Layout: ``<workdir>/checkpoints/<step>/{state, meta}``; ``state`` is the train state pytree
(saved with StandardSave, restored onto the shardings of an abstract target), ``meta`` a small
JSON dict describing the run (model, dataset, ...) so a resumed run can check it matches.
Only the newest ``keep`` checkpoints are preserved (orbax ``LatestN`` preservation policy).
Saves are asynchronous by default: device arrays are copied to host before ``save`` returns,
so the caller may donate the state to the next step; ``close`` waits for pending writes.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from mssar_jax.errors import ConfigError


class Checkpointer:
  """Save / restore the train state of one workdir."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.LatestN(n=keep),
        enable_async_checkpointing=async_save,
        create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    """The newest committed checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Saves ``state`` (a pytree of jax arrays) and ``meta`` (JSON) as checkpoint ``step``."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

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
    self._manager.wait_until_finished()
    self._manager.close()
