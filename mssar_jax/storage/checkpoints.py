"""Checkpoints with orbax (every orbax call of the project lives here).

Layout: ``<workdir>/checkpoints/<step>/{state, meta}``; ``state`` is the train state pytree
(saved with StandardSave, restored onto the shardings of an abstract target), ``meta`` a small
JSON dict describing the run (model, dataset, ...) so a resumed run can check it matches.
The workdir may be local or ``gs://`` (orbax and this module go through ``etils.epath``).
Only the newest ``keep`` checkpoints are preserved (orbax ``LatestN`` preservation policy).
Saves are asynchronous by default: device arrays are copied to host before ``save`` returns,
so the caller may donate the state to the next step; ``close`` waits for pending writes.

Crash safety: orbax writes a step into a temporary directory and renames it when complete, so
a process killed mid-save leaves no half-written step. ``restore_latest`` also survives a
committed step that was damaged afterwards (truncated or missing files): every process tries
the step, the processes share what they saw, and all of them make the same decision:

* all read it: resume from it;
* some found it damaged (missing or undecodable data): every process logs the cause, process
  0 moves the step to ``<workdir>/corrupt_checkpoints/`` (nothing is deleted) and all try the
  previous step;
* any other error (permissions, network, ...): every process raises ``CheckpointError`` with the
  same message, naming the step and the cause; nothing is moved.
"""

from __future__ import annotations

import time
from typing import Any

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from mssar_jax.errors import ConfigError

# Errors that mean "this step's files are missing or do not decode", as opposed to a storage
# or permission failure that another attempt (or a fix) would get past.
_DAMAGE = (FileNotFoundError, ValueError, KeyError, EOFError)
_MESSAGE_BYTES = 1024


class CheckpointError(RuntimeError):
  """A checkpoint could not be read for a reason other than damage (same on every host)."""


class Checkpointer:
  """Save / restore the train state of one workdir (local path or gs://)."""

  def __init__(self, workdir, *, keep: int, async_save: bool = True, create: bool = True):
    self.workdir = epath.Path(workdir)
    self.directory = self.workdir / "checkpoints"
    self._options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.LatestN(n=keep),
        enable_async_checkpointing=async_save,
        create=create, read_only=not create)
    self._manager = ocp.CheckpointManager(self.directory, options=self._options)

  def all_steps(self) -> list[int]:
    """Steps of the committed checkpoints, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Saves ``state`` (a pytree of jax arrays) and ``meta`` (JSON) as checkpoint ``step``."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def read_meta(self, step: int) -> dict[str, Any]:
    """The ``meta`` dict saved with checkpoint ``step``."""
    saved = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(saved["meta"] or {})

  def restore(self, step: int, abstract_state: Any, meta: dict[str, Any]) -> Any:
    """Restores checkpoint ``step`` onto the shapes/shardings of ``abstract_state``.

    Raises ConfigError if the checkpoint's ``meta`` disagrees with ``meta`` (another model or
    dataset in the same workdir).
    """
    saved_meta = self.read_meta(step)
    diff = {k: (saved_meta.get(k), v) for k, v in meta.items() if saved_meta.get(k) != v}
    if diff:
      described = "; ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
      raise ConfigError(f"the workdir {self.workdir} holds a checkpoint of a different run "
                        f"({described}); use a new --workdir or the same config.")
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def restore_latest(self, abstract_state: Any, meta: dict[str, Any]) -> tuple[int, Any]:
    """(step, state) of the newest checkpoint every process can read, or (0, None).

    Damaged steps are moved aside and skipped, any other error raises CheckpointError, in
    the same way on every process (module docstring).
    """
    damaged: list[int] = []
    try:
      for step in reversed(self.all_steps()):
        state, error = None, None
        try:
          state = self.restore(step, abstract_state, meta)
        except ConfigError:
          raise
        except Exception as e:  # pylint: disable=broad-exception-caught  (shared, then decided)
          error = e
        kinds, texts = _shared_errors(error)
        if not any(kinds):
          return step, state
        if any(kind == 2 for kind in kinds):
          cause = next(t for k, t in zip(kinds, texts) if k == 2)
          raise CheckpointError(f"cannot read checkpoint {step} in {self.directory}: {cause}; "
                                "fix the storage error and run again (nothing was moved).")
        cause = next(t for k, t in zip(kinds, texts) if k)
        logging.warning("checkpoint %d in %s is damaged (%s); falling back to the previous "
                        "one", step, self.directory, cause)
        damaged.append(step)
      return 0, None
    finally:
      if damaged:
        self._move_aside(damaged)

  def _move_aside(self, steps: list[int]) -> None:
    """Moves the damaged ``steps`` to ``<workdir>/corrupt_checkpoints/`` (process 0 moves)."""
    _sync("mssar_jax: checkpoints read")
    if jax.process_index() == 0:
      target = self.workdir / "corrupt_checkpoints"
      target.mkdir(parents=True, exist_ok=True)
      for step in steps:
        dest = target / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        _move_tree(self.directory / str(step), dest)
        logging.warning("moved the damaged checkpoint %d to %s", step, dest)
    _sync("mssar_jax: damaged checkpoints moved")
    self._manager.close()
    self._manager = ocp.CheckpointManager(self.directory, options=self._options)

  def close(self) -> None:
    """Waits for pending writes and releases the manager (safe to call twice)."""
    if self._manager is not None:
      self._manager.wait_until_finished()
      self._manager.close()
      self._manager = None


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _shared_errors(error: Exception | None) -> tuple[list[int], list[str]]:
  """Every process's (kind, message) for one restore: kind 0 read, 1 damaged, 2 other."""
  kind = 0 if error is None else (1 if isinstance(error, _DAMAGE) else 2)
  text = "" if error is None else f"{type(error).__name__}: {_first_line(error)}"
  if jax.process_count() == 1:
    return [kind], [text]
  local = np.zeros((_MESSAGE_BYTES + 1,), np.uint8)
  local[0] = kind
  encoded = text.encode()[:_MESSAGE_BYTES]
  local[1:1 + len(encoded)] = np.frombuffer(encoded, np.uint8)
  everyone = np.asarray(multihost_utils.process_allgather(local))
  return ([int(row[0]) for row in everyone],
          [bytes(row[1:]).rstrip(b"\0").decode(errors="replace") for row in everyone])


def _first_line(error: Exception) -> str:
  return (str(error).strip().splitlines() or [""])[0][:300]


def _move_tree(src: epath.Path, dst: epath.Path) -> None:
  """Moves a directory; on object stores that cannot rename directories, copies then deletes."""
  try:
    src.rename(dst)
    return
  except (OSError, NotImplementedError):
    pass
  key = lambda p: str(p).split("://", 1)[-1].rstrip("/")  # walk() drops the scheme
  for root, _, files in src.walk():
    relative = key(root)[len(key(src)):].lstrip("/")
    for name in files:
      target = dst / relative / name
      target.parent.mkdir(parents=True, exist_ok=True)
      (src / relative / name).copy(target)
  src.rmtree()
