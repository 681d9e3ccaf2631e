"""Preemption, kill -9, NaN, damaged checkpoints, bad configs, device and process counts,
determinism: the README's "Reliability" guarantees, each checked here.

Runs that need a real signal, a kill -9, another device count or a second process use
``tests/tiny_run.py`` in subprocesses; the others run in-process on 8 simulated devices.
"""

import concurrent.futures
import functools
import glob
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mssar_jax.storage import checkpoints
from mssar_jax import data as data_lib
from mssar_jax.storage import metrics as metrics_lib
from mssar_jax.train import loop, optim, state as state_lib
from mssar_jax.train import step as step_lib
from mssar_jax.errors import ConfigError
from tests import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = tiny.MOCK_EXAMPLES


# ---- helpers ---------------------------------------------------------------------------------

def _launch(workdir, *, devices=8, overrides=None, step_sleep=0.0, process=None):
  cmd = [sys.executable, os.path.join(ROOT, "tests", "tiny_run.py"), str(workdir),
         "--devices", str(devices), "--overrides", json.dumps(overrides or {}),
         "--step_sleep", str(step_sleep)]
  if process:
    cmd += ["--process_id", str(process[0]), "--num_processes", str(process[1]),
            "--coordinator", process[2]]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # keeps conftest's cache
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=300):
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err[-3000:]}"
  return out, err


def _finish_all(procs):
  """_finish for processes that wait on each other: their pipes are drained together (one
  process blocked on a full stderr pipe would hold the other at a barrier)."""
  with concurrent.futures.ThreadPoolExecutor(len(procs)) as pool:
    return list(pool.map(_finish, procs))


def _last_logged_step(workdir) -> int:
  try:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      lines = [line for line in f if line.endswith("\n")]
    return json.loads(lines[-1])["step"] if lines else 0
  except (FileNotFoundError, ValueError):
    return 0


def _wait_for_step(proc, workdir, step, timeout=240):
  deadline = time.time() + timeout
  while _last_logged_step(workdir) < step:
    assert proc.poll() is None, f"run ended early: {proc.communicate()}"
    assert time.time() < deadline, f"step {step} not reached"
    time.sleep(0.05)


def _latest_step(workdir) -> int:
  ckpt = checkpoints.Checkpointer(workdir, keep=100)
  try:
    return (ckpt.all_steps() or [0])[-1]
  finally:
    ckpt.close()


def _info(config):
  builder = data_lib.get_builder(config)
  return data_lib.get_info(config, builder, local_batch=config.batch_size,
                                 local_eval_batch=config.eval_batch_size, process_index=0,
                                 process_count=1)


def _restore(config, workdir, step):
  """The train state saved at ``step`` in ``workdir`` (restored on the 8-device mesh)."""
  model = state_lib.create_model(config, 10)
  tx = optim.make_optimizer(config, lambda _: 0.0)
  init = functools.partial(state_lib.init_state, model=model, tx=tx, image_size=32)
  rep = jax.sharding.NamedSharding(step_lib.make_mesh(), jax.sharding.PartitionSpec())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                          jax.eval_shape(init, jax.random.key(0)))
  meta = state_lib.checkpoint_meta(config, 32)
  ckpt = checkpoints.Checkpointer(workdir, keep=10)
  try:
    return ckpt.restore(step, abstract, meta)
  finally:
    ckpt.close()


def tfds_mock():
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  return tfds.testing.mock_data(num_examples=N, policy=tfds.testing.MockPolicy.USE_CODE)


def _assert_states_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _tree_digest(path) -> dict[str, str]:
  """Every file under ``path`` with a hash of its bytes and its mtime."""
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      with open(full, "rb") as f:
        out[os.path.relpath(full, path)] = (hashlib.sha256(f.read()).hexdigest(),
                                            os.stat(full).st_mtime_ns)
  return out


# ---- 1 + 2: preemption and kill -9 -----------------------------------------------------------

KILL_CONFIG = dict(num_train_steps=16, log_every_steps=1, eval_every_steps=8,
                   checkpoint_every_steps=3, keep_checkpoints=3, async_checkpointing=True)


@pytest.mark.slow
def test_sigint_and_kill9_resume_to_the_uninterrupted_result(tmp_path):
  """SIGINT (Ctrl-C), then kill -9, at seeded random steps, then run to the end.

  A signal must checkpoint exactly the step it stopped at (exit 0), and the next run resume
  there; a kill -9 resumes from the last committed checkpoint. (SIGTERM, the preemption
  signal, goes through the same handler: the two-process and gs:// tests send it.) The final parameters and
  metrics.jsonl equal those of one uninterrupted run, bit for bit (same program on one
  device; XLA:CPU is deterministic). One device per run: it is the fastest here, and the
  8-device equivalence is the subject of its own test.
  """
  config = tiny.tiny_cifar_config(**KILL_CONFIG)
  straight = str(tmp_path / "straight")
  _finish(_launch(straight, devices=1, overrides=KILL_CONFIG))
  expected = json.load(open(os.path.join(straight, "result.json")))

  workdir = str(tmp_path / "interrupted")
  rng = random.Random(4)  # the "random" steps, reproducibly
  done = 0
  for how in ("SIGINT", "kill"):
    target = rng.randint(done + 1, done + 3)
    proc = _launch(workdir, devices=1, overrides=KILL_CONFIG, step_sleep=0.2)
    _wait_for_step(proc, workdir, target)
    if how == "kill":
      proc.kill()  # SIGKILL: no handler runs
      proc.communicate(timeout=60)
      assert proc.returncode == -signal.SIGKILL
      done = _latest_step(workdir)
      continue
    proc.send_signal(getattr(signal, how))
    out, _ = _finish(proc)
    stopped = json.load(open(os.path.join(workdir, "result.json")))
    assert stopped["preempted"] and stopped["step"] >= target
    assert f"stopped by {how} after step {stopped['step']}/16; checkpoint saved" in out
    assert _latest_step(workdir) == stopped["step"]  # exactly the step it stopped at
    assert _last_logged_step(workdir) == stopped["step"]
    done = stopped["step"]

  proc = _launch(workdir, devices=1, overrides=KILL_CONFIG)
  out, _ = _finish(proc)
  assert f"resuming at step {done}" in out
  got = json.load(open(os.path.join(workdir, "result.json")))
  assert got.pop("resumed_from") == done and expected.pop("resumed_from") == 0
  assert got == expected
  assert metrics_lib.read_metrics(workdir) == metrics_lib.read_metrics(straight)
  _assert_states_equal(_restore(config, straight, 16), _restore(config, workdir, 16))


# ---- 3: NaN --------------------------------------------------------------------------------

def test_nan_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  config = tiny.tiny_cifar_config(num_train_steps=8, checkpoint_every_steps=2,
                                  keep_checkpoints=5, eval_every_steps=0)
  workdir = str(tmp_path / "run")
  original = data_lib.TrainData.iterate

  def poisoned(self, start_step=0):
    for i, batch in enumerate(original(self, start_step)):
      if start_step + i == 4:  # the batch of step 5
        batch = dict(batch, image=np.full(batch["image"].shape, np.nan, np.float32))
      yield batch

  monkeypatch.setattr(data_lib.TrainData, "iterate", poisoned)
  with tfds_mock(), pytest.raises(FloatingPointError, match="at step 5; stopping without"):
    loop.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  good = _restore(config, workdir, 4)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(good.params))
  # The same command without the poison resumes from the last good step and finishes.
  monkeypatch.setattr(data_lib.TrainData, "iterate", original)
  with tfds_mock():
    result = loop.train_and_evaluate(config, workdir)
  assert result["step"] == 8 and np.isfinite(result["eval/loss"])


# ---- 4: damaged checkpoints ----------------------------------------------------------------

def test_damaged_newest_checkpoints_are_reported_and_skipped(tmp_path, caplog):
  config = tiny.tiny_cifar_config(num_train_steps=6, keep_checkpoints=3, eval_every_steps=0)
  workdir = str(tmp_path / "run")
  with tfds_mock():
    first = loop.train_and_evaluate(config, workdir)
  metrics = metrics_lib.read_metrics(workdir)
  ckdir = os.path.join(workdir, "checkpoints")
  assert sorted(os.listdir(ckdir)) == ["2", "4", "6"]
  # Step 6: its data files truncated to half (a copy cut short). Step 4: its index lost.
  for path in glob.glob(os.path.join(ckdir, "6", "state", "**", "d", "*"), recursive=True):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  os.remove(os.path.join(ckdir, "4", "state", "manifest.ocdbt"))
  # And a save that a crash interrupted: orbax's temporary directory, never committed.
  os.makedirs(os.path.join(ckdir, "8.orbax-checkpoint-tmp-1234", "state"))

  with tfds_mock():
    again = loop.train_and_evaluate(config, workdir)
  warnings = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
  assert any(w.startswith("checkpoint 6 in ") for w in warnings), warnings
  assert any(w.startswith("checkpoint 4 in ") for w in warnings), warnings
  moved = sorted(os.listdir(os.path.join(workdir, "corrupt_checkpoints")))
  assert [m.split("-")[0] for m in moved] == ["4", "6"]  # kept, not deleted
  # Resumed from step 2 and redid steps 3-6 exactly.
  assert again.pop("resumed_from") == 2 and first.pop("resumed_from") == 0
  assert again == first
  assert metrics_lib.read_metrics(workdir) == metrics
  assert sorted(s for s in os.listdir(ckdir) if s.isdigit()) == ["2", "4", "6"]


# ---- 5: bad configurations -----------------------------------------------------------------

BAD_CONFIGS = {
    "unknown model": (dict(model="cifar_resnet21"), "unknown model 'cifar_resnet21'"),
    "unknown recalibration": (dict(recalibration="sar"), "unknown recalibration 'sar'"),
    "unknown dataset": (dict(dataset="mnist"), "config.dataset='mnist' is not supported"),
    "scale larger than the map": (dict(recalibration_kwargs=dict(scales=(2, 64))),
                                  "scale 64 is larger than the 32x32 feature map"),
    "batch not divisible": (dict(batch_size=20), "config.batch_size=20 is not divisible by "
                                                 "the 8 devices"),
    "eval batch not divisible": (dict(eval_batch_size=12), "config.eval_batch_size=12 is not"),
    "zero learning rate": (dict(learning_rate=0.0), "config.learning_rate=0.0 must be positive"),
    "negative learning rate": (dict(learning_rate=-0.1), "must be positive"),
    "no steps": (dict(num_train_steps=0, num_epochs=0), "nothing to train"),
    "zero reduction": (dict(recalibration_kwargs=dict(reduction=0)),
                       "reduction must be a positive number"),
    "unknown schedule": (dict(lr_schedule="linear"), "config.lr_schedule='linear' is unknown"),
    "label smoothing": (dict(label_smoothing=1.0), "config.label_smoothing=1.0 must be in"),
    "checkpoint of another model": (dict(recalibration="se", recalibration_kwargs={}),
                                    "holds a checkpoint of a different run"),
    "batch larger than the data": (dict(batch_size=64), "exceeds the 50 training examples"),
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("finished"))
  with tfds_mock():
    loop.train_and_evaluate(tiny.tiny_cifar_config(num_train_steps=2), workdir)
  return workdir


class _Compilations:
  """Counts XLA backend compilations while active."""

  def __init__(self):
    self.count = 0

  def __call__(self, event, *args, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self)


def _assert_one_line_error(config, workdir, expected):
  before = _tree_digest(workdir)
  with _Compilations() as compiled, pytest.raises(ConfigError) as raised:
    loop.train_and_evaluate(config, workdir)
  message = str(raised.value)
  assert expected in message
  assert "\n" not in message and len(message) < 400
  assert any(w in message for w in ("use ", "set ", "pass ", "lower ", "choose ", "drop ",
                                    "prepare ", "must be")), message
  assert compiled.count == 0, f"{compiled.count} XLA compilations before the error"
  assert _tree_digest(workdir) == before  # nothing in the workdir touched


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_is_one_line_before_compiling_and_touches_nothing(case, finished_run):
  overrides, expected = BAD_CONFIGS[case]
  config = tiny.tiny_cifar_config(**{"num_train_steps": 2, **overrides})
  with tfds_mock():
    _assert_one_line_error(config, finished_run, expected)


def test_missing_dataset_and_bad_workdir_are_one_line_errors(tmp_path, finished_run):
  config = tiny.tiny_cifar_config(dataset="cifar100", data_dir=str(tmp_path / "empty"))
  _assert_one_line_error(config, finished_run, "dataset 'cifar100' not found in")
  a_file = tmp_path / "file"
  a_file.write_text("not a workdir")
  with tfds_mock(), pytest.raises(ConfigError, match="is a file; pass a directory"):
    loop.train_and_evaluate(tiny.tiny_cifar_config(), str(a_file))
  assert a_file.read_text() == "not a workdir"


# ---- 6 + 7: one device, eight devices, two processes ---------------------------------------

EQUIV_CONFIG = dict(num_train_steps=6, log_every_steps=1, eval_every_steps=3,
                    checkpoint_every_steps=0)


@pytest.fixture(scope="module")
def eight_device_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("eight"))
  with tfds_mock():
    result = loop.train_and_evaluate(tiny.tiny_cifar_config(**EQUIV_CONFIG), workdir)
  return result, metrics_lib.read_metrics(workdir), workdir


def _assert_same_run(records, reference, result, reference_result, num_examples=N):
  """Same steps and metric names; losses within float32 reduction-order noise."""
  assert [r["step"] for r in records] == [r["step"] for r in reference] == list(range(1, 7))
  for got, want in zip(records, reference):
    assert set(got) == set(want)
    np.testing.assert_allclose(got["train/loss"], want["train/loss"], rtol=2e-5,
                               err_msg=f"step {got['step']}")
    assert got["train/learning_rate"] == want["train/learning_rate"]
  assert result["eval/num_examples"] == reference_result["eval/num_examples"] == num_examples
  np.testing.assert_allclose(result["eval/loss"], reference_result["eval/loss"], rtol=2e-5)
  assert result["eval/accuracy"] == reference_result["eval/accuracy"]


def test_one_device_matches_eight_devices(tmp_path, eight_device_run):
  _finish(_launch(tmp_path, devices=1, overrides=EQUIV_CONFIG))
  result = json.load(open(tmp_path / "result.json"))
  _assert_same_run(metrics_lib.read_metrics(str(tmp_path)), eight_device_run[1], result,
                   eight_device_run[0])


def _two_processes(workdir, overrides):
  """Runs tiny_run.py as two jax.distributed processes; (stdout of each, result of each)."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = [_launch(workdir, devices=1, overrides=overrides, process=(i, 2, f"localhost:{port}"))
           for i in range(2)]
  outs = [out for out, _ in _finish_all(procs)]
  results = [json.load(open(workdir / name)) for name in ("result.json", "result_1.json")]
  return outs, results


@pytest.mark.slow
def test_two_processes_match_one_process_and_resume_together(tmp_path):
  """Two processes x 1 device joined by jax.distributed (gloo CPU collectives) == one process
  x 8 devices, same global batches. Real CIFAR-10 slices: TFDS's mock data ignores the
  per-process eval splits, so only real files show that each test image counts once.
  Then the newest checkpoint of the shared workdir is damaged: both processes read it, share
  what they saw, move it aside once and resume from the same earlier step."""
  real = dict(EQUIV_CONFIG, data_dir=tiny.real_cifar10_dir(), train_split="train[:256]",
              eval_split="test[:100]", shuffle_buffer=256, checkpoint_every_steps=3)
  single = str(tmp_path / "single")
  expected = loop.train_and_evaluate(tiny.tiny_cifar_config(**real), single)
  multi = tmp_path / "multi"
  outs, results = _two_processes(multi, real)
  assert "2 cpu devices in 2 processes" in outs[0]
  assert "compilation cache: off (several CPU processes)" in outs[0]  # a warm one hangs them
  assert "done: step 6/6" in outs[0] and "done:" not in outs[1]  # process 0 reports
  assert results[0]["eval/num_examples"] == 100
  _assert_same_run(metrics_lib.read_metrics(str(multi)), metrics_lib.read_metrics(single),
                   results[0], expected, num_examples=100)

  os.remove(multi / "checkpoints" / "6" / "state" / "manifest.ocdbt")
  outs, again = _two_processes(multi, real)
  assert [r["resumed_from"] for r in again] == [3, 3] and "resuming at step 3" in outs[0]
  assert again[0]["step"] == again[1]["step"] == 6
  assert [m.split("-")[0] for m in os.listdir(multi / "corrupt_checkpoints")] == ["6"]
  _assert_same_run(metrics_lib.read_metrics(str(multi)), metrics_lib.read_metrics(single),
                   again[0], expected, num_examples=100)


@pytest.mark.slow
def test_sigterm_on_one_host_stops_all_hosts_at_the_same_step(tmp_path):
  """Multi-host preemption: SIGTERM to one of two jax.distributed processes; JAX's preemption
  sync point makes both checkpoint the same step and exit 0."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  config = dict(num_train_steps=40, log_every_steps=1, eval_every_steps=0,
                checkpoint_every_steps=0)
  procs = [_launch(tmp_path, devices=1, overrides=config, step_sleep=0.2,
                   process=(i, 2, f"localhost:{port}")) for i in range(2)]
  _wait_for_step(procs[0], tmp_path, 2)
  procs[1].send_signal(signal.SIGTERM)
  outs = _finish_all(procs)
  stopped = json.load(open(tmp_path / "result.json"))
  assert stopped["preempted"] and 2 <= stopped["step"] < 40
  assert f"stopped by SIGTERM after step {stopped['step']}/40" in outs[0][0]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == [str(stopped["step"])]


def test_a_storage_error_is_reported_with_its_cause_and_moves_nothing(tmp_path, monkeypatch):
  """Not damage (a permission or network error): every host fails with the cause; no step
  is moved aside and no older step is silently used."""
  config = tiny.tiny_cifar_config(num_train_steps=4, eval_every_steps=0)
  workdir = str(tmp_path / "run")
  with tfds_mock():
    loop.train_and_evaluate(config, workdir)

  def denied(self, step, abstract, meta):
    raise PermissionError(f"403 Forbidden reading step {step}")
  monkeypatch.setattr(checkpoints.Checkpointer, "restore", denied)
  with tfds_mock(), pytest.raises(checkpoints.CheckpointError,
                                  match="cannot read checkpoint 4 .*PermissionError: 403"):
    loop.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  assert not os.path.exists(os.path.join(workdir, "corrupt_checkpoints"))


# ---- 8: determinism ------------------------------------------------------------------------

def test_same_config_and_seed_give_identical_metrics_file(tmp_path, eight_device_run):
  with tfds_mock():
    loop.train_and_evaluate(tiny.tiny_cifar_config(**EQUIV_CONFIG), str(tmp_path))
  with open(os.path.join(tmp_path, "metrics.jsonl"), "rb") as f:
    again = f.read()
  with open(os.path.join(eight_device_run[2], "metrics.jsonl"), "rb") as f:
    assert again == f.read()
