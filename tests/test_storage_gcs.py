"""A gs:// workdir against a real GCS protocol server on loopback (tests/gcs_emulator.py):
train -> SIGTERM -> resume, then a damaged newest checkpoint moved aside, with every file
(config, metrics, checkpoints through orbax and tensorstore) in the bucket and nothing in a
local ``gs:`` directory. TensorBoard events are off here: TensorFlow's own GCS client cannot
be pointed at an emulator (against real GCS it writes them)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # read when gcsfs loads
import gcsfs  # noqa: E402  pylint: disable=wrong-import-position
import pytest  # noqa: E402  pylint: disable=wrong-import-position

from tests import gcs_emulator  # noqa: E402  pylint: disable=wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUCKET = "mssar-test"
CONFIG = dict(num_train_steps=8, log_every_steps=1, eval_every_steps=4,
              checkpoint_every_steps=2, keep_checkpoints=3, async_checkpointing=True,
              tensorboard=False)


@pytest.fixture(scope="module")
def gcs():
  with gcs_emulator.running(BUCKET) as url:
    yield url, gcsfs.GCSFileSystem(endpoint_url=url, token="anon")


def _launch(workdir, env, cwd, step_sleep=0.0):
  env = {k: v for k, v in env.items() if k != "XLA_FLAGS"}
  return subprocess.Popen(
      [sys.executable, str(ROOT / "tests" / "tiny_run.py"), workdir, "--devices", "1",
       "--overrides", json.dumps(CONFIG), "--step_sleep", str(step_sleep)],
      cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc):
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err[-3000:]}"
  return out


def _records(fs, name):
  path = f"{BUCKET}/run/{name}"
  fs.invalidate_cache()
  if not fs.exists(path):
    return []
  return [json.loads(line) for line in fs.cat(path).decode().splitlines() if line.strip()]


def _checkpoints(fs, prefix="run/checkpoints"):
  fs.invalidate_cache()
  return sorted(int(p.rsplit("/", 1)[1]) for p in fs.ls(f"{BUCKET}/{prefix}")
                if p.rsplit("/", 1)[1].isdigit())


@pytest.mark.slow
def test_gs_workdir_preemption_resume_and_damaged_checkpoint(gcs, tmp_path):
  url, fs = gcs
  env = gcs_emulator.storage_environment(url)
  workdir = f"gs://{BUCKET}/run"

  proc = _launch(workdir, env, tmp_path, step_sleep=0.4)
  deadline = time.time() + 240
  while not [r for r in _records(fs, "metrics.jsonl") if r["step"] >= 3]:
    assert proc.poll() is None, proc.communicate()
    assert time.time() < deadline, "step 3 not reached"
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out = _finish(proc)
  stopped = json.loads(fs.cat(f"{BUCKET}/run/result.json"))
  assert stopped["preempted"] == "SIGTERM" and 3 <= stopped["step"] < 8
  assert f"stopped by SIGTERM after step {stopped['step']}/8; checkpoint saved" in out
  assert _checkpoints(fs)[-1] == stopped["step"]
  assert json.loads(fs.cat(f"{BUCKET}/run/config.json"))["num_train_steps"] == 8

  out = _finish(_launch(workdir, env, tmp_path))
  assert f"resuming at step {stopped['step']}" in out and f"workdir {workdir}" in out
  finished = json.loads(fs.cat(f"{BUCKET}/run/result.json"))
  assert finished["step"] == 8 and finished["resumed_from"] == stopped["step"]
  metrics = _records(fs, "metrics.jsonl")
  assert [r["step"] for r in metrics] == list(range(1, 9))
  assert [r["step"] for r in _records(fs, "perf.jsonl")] == list(range(1, 9))
  assert _checkpoints(fs) == [4, 6, 8]

  # The newest checkpoint loses its index: reported, moved aside in the bucket, and the run
  # redoes steps 7-8 from step 6 to the same result.
  fs.rm(f"{BUCKET}/run/checkpoints/8/state/manifest.ocdbt")
  proc = _launch(workdir, env, tmp_path)
  out = _finish(proc)
  again = json.loads(fs.cat(f"{BUCKET}/run/result.json"))
  assert again["resumed_from"] == 6
  assert {k: v for k, v in again.items() if k != "resumed_from"} == {
      k: v for k, v in finished.items() if k != "resumed_from"}
  assert _records(fs, "metrics.jsonl") == metrics
  fs.invalidate_cache()
  moved = [p.rsplit("/", 1)[1] for p in fs.ls(f"{BUCKET}/run/corrupt_checkpoints")]
  assert [m.split("-")[0] for m in moved] == ["8"]
  assert _checkpoints(fs) == [4, 6, 8]

  # Nothing went to a local directory named after the URL.
  for where in (tmp_path, ROOT):
    assert not [p for p in where.iterdir() if p.name.startswith("gs:")], where
