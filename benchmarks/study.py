r"""The evidence study: cifar_resnet20 with none / se / ms_sar, several seeds, one schedule.

    # train every (seed, variant) not yet recorded, one after the other, each through
    # train.py in its own process; a finished run's record goes to docs/study/runs/<name>/
    python benchmarks/study.py train --data_dir ../shared/data/tfds --runs /tmp/study
    # the table and the figure, from the records in docs/study/runs/ alone
    python benchmarks/study.py report

A run is ``configs/cifar.py:cifar10,cifar_resnet20,<variant>`` (He et al.'s recipe: SGD
momentum 0.9, lr 0.1 at batch 128, weight decay 1e-4, lr / 10 at 50% and 75%) for
``--epochs`` epochs, evaluated on the whole test split after every epoch. Its record is the
workdir's ``config.json``, ``metrics.jsonl`` and ``perf.jsonl`` plus ``summary.json`` (one
line: final accuracy, training time, machine, commit), copied when the run ends; with
``--commit`` it is also committed at once, so a study can span days and machines. An
interrupted run resumes from its checkpoint when the command is run again. While the file
``<runs>/PAUSE`` exists no run is (re)started: ``touch <runs>/PAUSE`` and SIGTERM the
trainer to lend the machine to something else; remove the file and the run resumes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("none", "se", "ms_sar")
TRAIN_EXAMPLES = 50_000
RECORD_FILES = ("config.json", "metrics.jsonl", "perf.jsonl")


def steps_per_epoch(batch_size: int) -> int:
  return TRAIN_EXAMPLES // batch_size


def train_command(variant: str, seed: int, workdir: str, *, epochs: int, data_dir: str,
                  overrides: list[str], python: str = "python") -> list[str]:
  """The train.py command line of one run."""
  epoch = steps_per_epoch(128)
  return [python, "train.py",
          f"--config=configs/cifar.py:cifar10,cifar_resnet20,{variant}",
          f"--workdir={workdir}",
          f"--config.num_epochs={epochs}", f"--config.seed={seed}",
          f"--config.data_dir={data_dir}",
          f"--config.eval_every_steps={epoch}", f"--config.checkpoint_every_steps={epoch}",
          f"--config.log_every_steps={epoch // 3}", "--config.eval_batch_size=1000",
          "--config.keep_checkpoints=2", "--config.model_kwargs.scan_blocks=False",
          *[f"--config.{o}" for o in overrides]]


def _records(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def finished(workdir: str, total_steps: int) -> bool:
  records = _records(os.path.join(workdir, "metrics.jsonl"))
  return bool(records) and records[-1]["step"] == total_steps and "eval/accuracy" in records[-1]


class CpuMonitor:
  """Share of the machine's CPU time used by other processes while ``pid`` runs."""

  def __init__(self, pid: int, every: float = 20.0):
    self.pid, self.every = pid, every
    self.other = self.total = 0.0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _sample(self):
    with open("/proc/stat", encoding="utf-8") as f:
      fields = [float(x) for x in f.readline().split()[1:]]
    busy, total = sum(fields) - fields[3] - fields[4], sum(fields)
    try:
      with open(f"/proc/{self.pid}/stat", encoding="utf-8") as f:
        parts = f.read().rsplit(")", 1)[1].split()
      own = float(parts[11]) + float(parts[12])
    except OSError:
      own = None
    return busy, total, own

  def _run(self):
    previous = self._sample()
    while not self._stop.wait(self.every):
      current = self._sample()
      if previous[2] is not None and current[2] is not None:
        self.other += max(0.0, (current[0] - previous[0]) - (current[2] - previous[2]))
        self.total += current[1] - previous[1]
      previous = current

  def stop(self) -> float:
    self._stop.set()
    self._thread.join()
    return self.other / self.total if self.total else 0.0


def machine() -> dict:
  model = ""
  flags = set()
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name") and not model:
          model = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not flags:
          flags = set(line.split(":", 1)[1].split())
  return {"cpu": model, "cores": os.cpu_count(), "avx512": "avx512f" in flags,
          "python": platform.python_version()}


def commit_of(path: str) -> str:
  rev = subprocess.run(["git", "-C", path, "rev-parse", "--short=12", "HEAD"],
                       capture_output=True, text=True, check=False).stdout.strip()
  dirty = subprocess.run(["git", "-C", path, "status", "--porcelain", "--untracked-files=no"],
                         capture_output=True, text=True, check=False).stdout.strip()
  return rev + ("-dirty" if dirty else "") if rev else "unknown"


def record_run(name: str, workdir: str, out: str, *, other_cpu: float, command: list[str],
               commit: bool) -> str:
  """Copies the run's files to ``<out>/<name>/`` with summary.json; commits it if asked."""
  dest = os.path.join(out, name)
  os.makedirs(dest, exist_ok=True)
  for f in RECORD_FILES:
    shutil.copyfile(os.path.join(workdir, f), os.path.join(dest, f))
  config = json.load(open(os.path.join(workdir, "config.json"), encoding="utf-8"))
  metrics = _records(os.path.join(workdir, "metrics.jsonl"))
  perf = _records(os.path.join(workdir, "perf.jsonl"))
  seconds = perf[-1]["train_seconds"]
  steps = metrics[-1]["step"]
  summary = {
      "name": name, "variant": config["recalibration"], "seed": config["seed"],
      "steps": steps, "test_accuracy": metrics[-1]["eval/accuracy"],
      "train_seconds": seconds,
      "images_per_second": round(steps * config["batch_size"] / seconds, 1),
      "other_cpu_share": round(other_cpu, 3),
      "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "commit": commit_of(ROOT), **machine(),
      "command": " ".join(shlex.quote(c) for c in ["python", *command[1:]])}
  with open(os.path.join(dest, "summary.json"), "w", encoding="utf-8") as f:
    f.write(json.dumps(summary) + "\n")
  if commit:
    repo = subprocess.run(["git", "-C", dest, "rev-parse", "--show-toplevel"],
                          capture_output=True, text=True, check=True).stdout.strip()
    message = (f"Study: {name} finished, {100 * summary['test_accuracy']:.2f}% test accuracy\n\n"
               f"{summary['steps']} steps in {seconds / 60:.1f} min of training "
               f"({summary['images_per_second']} img/s, other processes "
               f"{100 * other_cpu:.0f}% of the CPU) on {summary['cpu']}; code at "
               f"{summary['commit']}.")
    for attempt in range(30):  # another git command may hold the index lock for a moment
      add = subprocess.run(["git", "-C", repo, "add", "--", dest], capture_output=True)
      done = add.returncode == 0 and subprocess.run(
          ["git", "-C", repo, "commit", "-q", "-m", message, "--", dest],
          capture_output=True).returncode == 0
      if done:
        break
      time.sleep(10)
  return dest


def train(args) -> int:
  overrides = list(args.set)
  variants = [v for v in args.variants.split(",") if v]
  seeds = [int(s) for s in args.seeds.split(",") if s]
  total = args.epochs * steps_per_epoch(128)
  for o in overrides:  # a shortened run (for tests): num_train_steps=N
    if o.startswith("num_train_steps="):
      total = int(o.split("=", 1)[1])
  pause = os.path.join(args.runs, "PAUSE")
  os.makedirs(args.runs, exist_ok=True)
  for seed in seeds:
    for variant in variants:
      name = f"{variant}{args.suffix}_seed{seed}"
      if os.path.exists(os.path.join(args.out, name, "summary.json")):
        print(f"study: {name} is recorded; skipped", flush=True)
        continue
      workdir = os.path.join(args.runs, name)
      command = train_command(variant, seed, workdir, epochs=args.epochs,
                              data_dir=args.data_dir, overrides=overrides,
                              python=sys.executable)
      other, watched = 0.0, 0.0
      while not finished(workdir, total):
        while os.path.exists(pause):
          time.sleep(15)
        print(f"study: training {name}: {' '.join(command[1:])}", flush=True)
        process = subprocess.Popen(command, cwd=ROOT)
        monitor = CpuMonitor(process.pid)
        code = process.wait()
        share = monitor.stop()
        other = (other * watched + share * monitor.total) / max(watched + monitor.total, 1e-9)
        watched += monitor.total
        if code != 0:
          print(f"study: {name} failed (exit status {code}); fix it and run again.",
                file=sys.stderr)
          return code
      dest = record_run(name, workdir, args.out, other_cpu=other, command=command,
                        commit=args.commit)
      print(f"study: {name} recorded in {dest}", flush=True)
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python benchmarks/study.py", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  t = sub.add_parser("train", help="train the runs not yet recorded")
  t.add_argument("--data_dir", required=True, help="TFDS data_dir holding cifar10")
  t.add_argument("--runs", required=True, help="where the run workdirs (checkpoints) go")
  t.add_argument("--out", default=os.path.join(ROOT, "docs", "study", "runs"))
  t.add_argument("--epochs", type=int, default=15)
  t.add_argument("--seeds", default="0,1,2")
  t.add_argument("--variants", default=",".join(VARIANTS))
  t.add_argument("--suffix", default="", help="added to the variant in run names")
  t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override for every run, e.g. recalibration_kwargs.x=1")
  t.add_argument("--commit", action="store_true", help="git commit each run's record")
  args = parser.parse_args(argv)
  if args.command == "train":
    return train(args)
  return 2


if __name__ == "__main__":
  raise SystemExit(main())
