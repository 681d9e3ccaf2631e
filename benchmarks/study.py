r"""The evidence study: cifar_resnet20 with none / se / ms_sar, several seeds, one schedule.

    # train every (seed, variant) not yet recorded, one after the other, each through
    # train.py in its own process; a finished run's record goes to docs/study/runs/<name>/
    python benchmarks/study.py train --data_dir ../shared/data/tfds --runs /tmp/study
    # the table and the figure, from the records in docs/study/runs/ alone
    python benchmarks/study.py report
    # a shortened run: train.py config keys for every run
    python benchmarks/study.py train --data_dir ... --runs /tmp/s --config.num_train_steps=8 \
        --config.model_kwargs.depth=8

A run is ``configs/cifar.py:cifar10,cifar_resnet20,<variant>`` (He et al.'s recipe: SGD
momentum 0.9, lr 0.1 at batch 128, weight decay 1e-4, lr / 10 at 50% and 75%) for
``--epochs`` epochs, evaluated on the whole test split after every epoch. Its record is the
workdir's ``config.json``, ``metrics.jsonl`` and ``perf.jsonl`` plus ``summary.json`` (one
line: final accuracy, training time, machine, commit), copied when the run ends; with
``--commit`` it is also committed at once, so a study can span days and machines. An
interrupted run resumes from its checkpoint when the command is run again. While the file
``<runs>/PAUSE`` exists no run is (re)started: ``touch <runs>/PAUSE`` and SIGTERM the
trainer to lend the machine to something else; remove the file and the run resumes.
``--config.<key>=<value>`` sets a key of train.py's config (``--helpfull`` lists them; the
ms_sar variant's config, so ``recalibration_kwargs.*`` too) for every run: each key given on
the command line is passed on to train.py as ``--config.<key>=<value>``, after the tool's own
settings, so it wins: a shortened run (tests) can set ``num_train_steps``,
``eval_every_steps``, ``log_every_steps``, ``checkpoint_every_steps``, ``train_split``,
``batch_size``, ... without changing the defaults. Without any, the train.py commands are
the study's own.

The command is the first positional argument, ``train`` or ``report``; the flags are one set
(absl): those that only ``train`` uses (``--data_dir``, ``--epochs``, ``--seeds``,
``--variants``, ``--suffix``, ``--commit``) are ignored by ``report``, which takes no
``--config.<key>``. ``--runs`` and ``--out`` belong to both, with a meaning and default per
command: train's ``--runs`` holds the workdirs (required), its ``--out`` (default
docs/study/runs) the records; report reads the records from ``--runs`` (default
docs/study/runs) and writes to ``--out`` (default docs/study).

``report`` reads only the recorded runs under ``--runs`` (each ``<variant>[suffix]_seed<seed>/``
directory with a ``summary.json``; of it only ``config.json``, ``metrics.jsonl``,
``perf.jsonl`` and ``summary.json``) and writes ``<out>/results.md`` and ``<out>/curves.png``:
per variant the final test accuracy, the mean of the last three evaluations and the best; the
paired differences between variants over the seeds both have (runs of one seed see the same
data order): mean, standard error (sample std / sqrt(n)) and range; the training time and
steps to first reach 85% and 88% test accuracy. It needs neither JAX nor the workdirs.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import math
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
import types
from typing import Sequence

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("none", "se", "ms_sar")
TRAIN_EXAMPLES = 50_000
RECORD_FILES = ("config.json", "metrics.jsonl", "perf.jsonl")
DEFAULT_OUT = os.path.join(ROOT, "docs", "study")
DEFAULT_RUNS = os.path.join(DEFAULT_OUT, "runs")


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
  # GIT_OPTIONAL_LOCKS=0: `git status` does not refresh (write) the index, so it never holds
  # the index lock that a concurrent `git add` of a finished run needs.
  dirty = subprocess.run(["git", "-C", path, "status", "--porcelain", "--untracked-files=no"],
                         capture_output=True, text=True, check=False,
                         env=dict(os.environ, GIT_OPTIONAL_LOCKS="0")).stdout.strip()
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
  overrides = [f"{key}={_flag_text(value)}" for key, value in args.config_overrides]
  variants = [v for v in args.variants.split(",") if v]
  seeds = [int(s) for s in args.seeds.split(",") if s]
  total = args.epochs * steps_per_epoch(128)
  for key, value in args.config_overrides:  # a shortened run (for tests): num_train_steps=N
    if key == "num_train_steps":
      total = int(value)
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


# ---------------------------------------------------------------------------------------------
# report: the tables and the figure, from the recorded runs alone
# ---------------------------------------------------------------------------------------------

REPORT_FILES = (*RECORD_FILES, "summary.json")
THRESHOLDS = (0.85, 0.88)
STANDARD_PAIRS = (("ms_sar", "se"), ("ms_sar", "none"), ("se", "none"))
SHARED_CPU = 0.05  # other processes' share of the CPU above which a run's timings are suspect
_RUN_NAME = re.compile(r"^(?P<variant>.+)_seed(?P<seed>\d+)$")


def _read_json(path: str) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.loads(f.read())


def split_examples(split: str, total: int = TRAIN_EXAMPLES) -> int:
  """Examples in a TFDS split of the ``total``-example train split: 'train' -> total,
  'train[:512]' -> 512, 'train[10%:]' -> 90% of total; anything else -> total."""
  m = re.fullmatch(r"\s*\w+\s*(?:\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\])?\s*", split)
  if not m:
    return total

  def bound(text, default):
    if text is None:
      return default
    value = (total * int(text[:-1]) // 100) if text.endswith("%") else int(text)
    return min(max(value + total if value < 0 else value, 0), total)

  return max(bound(m.group(2), total) - bound(m.group(1), 0), 0)


class Run:
  """One recorded run: its four files and what the report derives from them."""

  def __init__(self, path: str):
    self.path = path
    self.name = os.path.basename(os.path.normpath(path))
    self.config = _read_json(os.path.join(path, "config.json"))
    self.summary = _read_json(os.path.join(path, "summary.json"))
    self.metrics = _by_step(_records(os.path.join(path, "metrics.jsonl")))
    self.perf = _by_step(_records(os.path.join(path, "perf.jsonl")))
    m = _RUN_NAME.match(self.name)
    self.variant = m.group("variant") if m else str(self.summary["variant"])
    self.seed = int(self.summary.get("seed", m.group("seed") if m else 0))
    self.base = str(self.summary.get("variant", self.config.get("recalibration", "")))
    self.evals = [(r["step"], float(r["eval/accuracy"])) for r in self.metrics
                  if "eval/accuracy" in r]
    self.losses = [(r["step"], float(r["train/loss"])) for r in self.metrics
                   if "train/loss" in r]
    self.seconds = {r["step"]: float(r["train_seconds"]) for r in self.perf}
    if not self.evals:
      raise ValueError("metrics.jsonl has no evaluation")
    batch = int(self.config["batch_size"])
    self.steps_per_epoch = max(split_examples(str(self.config.get("train_split", "train")))
                               // batch, 1)

  @property
  def final(self) -> float:
    return self.evals[-1][1]

  @property
  def last3(self) -> float:
    return statistics.fmean(a for _, a in self.evals[-3:])

  @property
  def best(self) -> tuple[float, int]:
    """(best accuracy, its first step)."""
    accuracy, step = max((a, -s) for s, a in self.evals)
    return accuracy, -step

  def reach(self, threshold: float):
    """(step, training seconds or None) of the first evaluation at >= threshold, else None."""
    for step, accuracy in self.evals:
      if accuracy >= threshold:
        return step, self.seconds.get(step)
    return None


def _by_step(records: list[dict]) -> list[dict]:
  """Records sorted by step, the last one of a repeated step kept."""
  return sorted({r["step"]: r for r in records}.values(), key=lambda r: r["step"])


def load_runs(runs_dir: str) -> tuple[list[Run], list[str]]:
  """The recorded runs under ``runs_dir`` (directories holding a summary.json) and the
  problems met (a record that cannot be read is skipped and named)."""
  runs, problems = [], []
  for name in sorted(os.listdir(runs_dir)):
    path = os.path.join(runs_dir, name)
    if not os.path.isfile(os.path.join(path, "summary.json")):
      continue
    missing = [f for f in RECORD_FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
      problems.append(f"{name}: skipped, no {', '.join(missing)}")
      continue
    try:
      run = Run(path)
    except (ValueError, KeyError, TypeError) as e:
      problems.append(f"{name}: skipped, unreadable record ({e})")
      continue
    last_step, last_accuracy = run.evals[-1]
    if run.summary.get("steps") != last_step or not math.isclose(
        float(run.summary.get("test_accuracy", -1)), last_accuracy, abs_tol=1e-9):
      problems.append(f"{name}: summary.json (step {run.summary.get('steps')}, accuracy "
                      f"{run.summary.get('test_accuracy')}) disagrees with metrics.jsonl's "
                      f"last evaluation (step {last_step}, {last_accuracy})")
    runs.append(run)
  return runs, problems


def variant_order(runs: list[Run]) -> list[str]:
  """none, se, ms_sar first, then suffixed variants after their base variant."""
  bases = {r.variant: r.base for r in runs}

  def key(v):
    base = bases[v]
    return (VARIANTS.index(base) if base in VARIANTS else len(VARIANTS), v != base, v)

  return sorted(bases, key=key)


def _stats(values: list[float]) -> dict:
  """Mean, sample std, standard error, Student-t 95% interval half-width (n - 1 degrees of
  freedom) and range of ``values``."""
  from scipy import stats  # pylint: disable=import-outside-toplevel (a jax dependency)
  n = len(values)
  std = statistics.stdev(values) if n > 1 else None
  se = std / math.sqrt(n) if std is not None else None
  return {"n": n, "mean": statistics.fmean(values) if n else None, "std": std, "se": se,
          "ci95": float(stats.t.ppf(0.975, n - 1)) * se if se is not None else None,
          "min": min(values) if n else None, "max": max(values) if n else None}


def paired(runs: list[Run], a: str, b: str) -> dict:
  """a - b over the seeds both variants have: final accuracy and mean of the last three."""
  by_a = {r.seed: r for r in runs if r.variant == a}
  by_b = {r.seed: r for r in runs if r.variant == b}
  seeds = sorted(set(by_a) & set(by_b))
  return {"a": a, "b": b, "seeds": seeds,
          "final": _stats([by_a[s].final - by_b[s].final for s in seeds]),
          "last3": _stats([by_a[s].last3 - by_b[s].last3 for s in seeds])}


def analyse(runs: list[Run]) -> dict:
  """Every number of the report (fractions, not percent)."""
  variants = variant_order(runs)
  per_variant = {}
  for v in variants:
    rs = sorted((r for r in runs if r.variant == v), key=lambda r: r.seed)
    reach = {}
    for t in THRESHOLDS:
      hits = [r.reach(t) for r in rs]
      done = [h for h in hits if h is not None]
      reach[t] = {"reached": len(done), "of": len(rs),
                  "steps": statistics.fmean(h[0] for h in done) if done else None,
                  "seconds": (statistics.fmean(h[1] for h in done)
                              if done and all(h[1] is not None for h in done) else None)}
    per_variant[v] = {"seeds": [r.seed for r in rs],
                      "final": _stats([r.final for r in rs]),
                      "last3": _stats([r.last3 for r in rs]),
                      "best": _stats([r.best[0] for r in rs]),
                      "reach": reach}
  pairs = [(a, b) for a, b in STANDARD_PAIRS]
  for i in range(len(variants) - 1, 0, -1):
    for j in range(i - 1, -1, -1):
      if (variants[i], variants[j]) not in pairs:
        pairs.append((variants[i], variants[j]))
  per_run = {}
  for r in runs:
    per_run[r.name] = {
        "variant": r.variant, "seed": r.seed, "final": r.final, "last3": r.last3,
        "best": r.best, "reach": {t: r.reach(t) for t in THRESHOLDS},
        "images_per_second": r.summary.get("images_per_second"),
        "other_cpu_share": r.summary.get("other_cpu_share"),
        "steps_per_epoch": r.steps_per_epoch}
  return {"variants": variants, "per_variant": per_variant,
          "pairs": [paired(runs, a, b) for a, b in pairs], "per_run": per_run}


def _pct(x) -> str:
  return "n/a" if x is None else f"{100 * x:.2f}%"


def _pp(x, sign: bool = True) -> str:
  return "n/a" if x is None else (f"{100 * x:+.2f}" if sign else f"{100 * x:.2f}")


def _minutes(seconds) -> str:
  return "n/a" if seconds is None else f"{seconds / 60:.1f} min"


def _mean_std(s: dict) -> str:
  return f"{_pct(s['mean'])} ± {_pp(s['std'], sign=False)}"


def _reach_cell(run: Run, threshold: float) -> str:
  hit = run.reach(threshold)
  if hit is None:
    accuracy, step = run.best
    return f"not reached (best {_pct(accuracy)} at step {step})"
  step, seconds = hit
  return f"step {step} (epoch {step / run.steps_per_epoch:.1f}), {_minutes(seconds)}"


def _steps(config: dict) -> tuple[int, int, int, list[int]]:
  """(steps per epoch, total steps, warm-up steps, lr drop steps) as the trainer computes
  them (mssar_jax/train/optim.py)."""
  batch = int(config["batch_size"])
  per_epoch = max(split_examples(str(config.get("train_split", "train"))) // batch, 1)
  total = (int(config["num_train_steps"]) if config.get("num_train_steps", -1) > 0
           else int(config["num_epochs"] * per_epoch))
  warm = int(config.get("warmup_steps", 0))
  if warm < 0:
    warm = int(round(config.get("warmup_epochs", 0.0) * per_epoch))
  warm = min(warm, total)
  drops = ([warm + int(round(b * max(total - warm, 1))) for b in config["lr_boundaries"]]
           if config.get("lr_schedule", "step") == "step" else [])
  return per_epoch, total, warm, drops


def _schedule(config: dict) -> str:
  batch = int(config["batch_size"])
  per_epoch, total, warm, steps = _steps(config)
  lr = config["learning_rate"] * batch / config.get("reference_batch_size", batch)
  if config.get("lr_schedule", "step") == "step":
    decay = (f", x{config['lr_decay_factor']:g} at "
             + " and ".join(f"{100 * b:g}%" for b in config["lr_boundaries"])
             + f" (steps {', '.join(map(str, steps))})")
  else:
    decay = f", {config['lr_schedule']} decay"
  momentum = ("Nesterov " if config.get("nesterov") else "") + f"momentum {config['momentum']:g}"
  epochs = total / per_epoch
  return (f"{epochs:g} epoch{'' if epochs == 1 else 's'} ({total} steps of batch {batch}, "
          f"{per_epoch} steps per epoch on `{config.get('train_split', 'train')}`), "
          f"SGD {momentum}, lr {lr:g}{decay}" + (f", {warm} warm-up steps" if warm else "")
          + f", weight decay {config['weight_decay']:g}"
          + ("" if config.get("weight_decay_on_bn_and_bias", True)
             else " (not on BatchNorm and biases)")
          + f"; evaluated on `{config.get('eval_split', 'test')}` every "
          f"{config['eval_every_steps']} steps")


def _flatten(config: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in config.items():
    if isinstance(value, dict) and value:
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = json.dumps(value, sort_keys=True)
  return flat


def _config_differences(runs: list[Run]) -> list[str]:
  """'key: value (runs)' for config keys that differ between runs, seed and variant aside."""
  flats = {r.name: _flatten(r.config) for r in runs}
  keys = sorted(set().union(*flats.values()) - {"seed", "recalibration", "data_dir"})
  lines = []
  for key in keys:
    values = {}
    for r in runs:
      values.setdefault(flats[r.name].get(key, "(unset)"), []).append(r.name)
    if len(values) > 1:
      lines.append(f"`{key}`: " + "; ".join(f"{v} ({', '.join(names)})"
                                             for v, names in values.items()))
  return lines


def _shown(path: str) -> str:
  """A path relative to the repository root when inside it, else absolute."""
  path = os.path.abspath(path)
  inside = os.path.commonpath([path, ROOT]) == ROOT
  return os.path.relpath(path, ROOT) if inside else path


def _grouped(groups: dict[str, list[str]]) -> str:
  """The one key, or each key with the runs that have it."""
  if len(groups) == 1:
    return next(iter(groups))
  return "; ".join(f"{k} ({', '.join(v)})" for k, v in groups.items())


def _by_seed(runs: list[Run], variant: str) -> list[Run]:
  return sorted((r for r in runs if r.variant == variant), key=lambda r: r.seed)


def _header_lines(runs: list[Run]) -> list[str]:
  """What was run, when, where and from which commit; config differences between runs."""
  finished_at = sorted(str(r.summary.get("finished", "")) for r in runs)
  machines, commits = {}, {}
  for r in runs:
    s = r.summary
    avx = ", AVX-512" if s.get("avx512") else ""
    machines.setdefault(f"{s.get('cpu', '?')} ({s.get('cores', '?')} cores{avx}), "
                        f"Python {s.get('python', '?')}", []).append(r.name)
  for r in runs:
    commits.setdefault(str(r.summary.get("commit", "?")), []).append(r.name)
  lines = [
      f"{len(runs)} recorded run(s) of `configs/cifar.py:cifar10,cifar_resnet20,<variant>`: "
      f"{_schedule(runs[0].config)}.",
      "",
      f"- Report written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC "
      f"from the records in `{_shown(os.path.dirname(runs[0].path))}/`; runs finished "
      f"{finished_at[0][:10]}"
      + (f" to {finished_at[-1][:10]}." if finished_at[-1][:10] != finished_at[0][:10] else "."),
      f"- Machine: {_grouped(machines)}; one run after the other.",
      f"- Code: commit {_grouped(commits)}.",
  ]
  differences = _config_differences(runs)
  if differences:
    lines.append("- Config differences between runs (seed and variant aside): "
                 + " | ".join(differences) + ".")
  return lines


def _per_variant_lines(runs: list[Run], analysis: dict) -> list[str]:
  """Per variant: final, last-3 and best accuracy over seeds, time to each threshold."""
  lines = ["", "## Per variant", "",
           "Test accuracy on the whole test split; ± sample standard deviation over seeds in "
           "percentage points (n/a for one seed). Last-3: mean of the last three evaluations "
           "of a run. Time to accuracy: mean over the seeds that reached it, of the first "
           "evaluation at or above the threshold; time is training time (perf.jsonl's "
           "train_seconds: compilation, evaluations and checkpoint saves excluded).",
           "",
           "| variant | seeds | final test accuracy | last-3 evals | best (mean) | "
           + " | ".join(f"to {100 * t:g}%" for t in THRESHOLDS) + " |",
           "|---|---|---:|---:|---:|" + "---:|" * len(THRESHOLDS)]
  for v in analysis["variants"]:
    p = analysis["per_variant"][v]
    cells = []
    for t in THRESHOLDS:
      reach = p["reach"][t]
      if reach["reached"]:
        epoch = reach["steps"] / statistics.fmean(r.steps_per_epoch for r in runs
                                                   if r.variant == v)
        cells.append(f"{reach['reached']}/{reach['of']} seeds: {reach['steps']:.0f} steps "
                     f"(epoch {epoch:.1f}), {_minutes(reach['seconds'])}")
      else:
        cells.append(f"not reached by {reach['of']} seed(s) (best {_pct(p['best']['max'])})")
    lines.append(f"| {v} | {', '.join(map(str, p['seeds']))} | {_mean_std(p['final'])} | "
                 f"{_mean_std(p['last3'])} | {_pct(p['best']['mean'])} | "
                 + " | ".join(cells) + " |")
  return lines


def _paired_lines(analysis: dict) -> list[str]:
  """Paired differences between variants, seed by seed, in percentage points."""
  lines = ["", "## Paired differences", "",
           "Runs of the same seed see the same data order, so variants are compared seed by "
           "seed, over the seeds both have (n). In percentage points: mean difference, its "
           "standard error (sample std of the n differences / sqrt(n); n/a for n = 1), "
           "the 95% confidence interval of the mean (Student t, n - 1 degrees of freedom) "
           "and the range of the differences.",
           "",
           "| difference | seeds (n) | final: mean | SE | 95% CI | range | last-3: mean | SE "
           "| 95% CI | range |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for pair in analysis["pairs"]:
    label = f"{pair['a']} - {pair['b']}"
    if not pair["seeds"]:
      missing = [v for v in (pair["a"], pair["b"]) if v not in analysis["variants"]]
      why = (f"{' and '.join(missing)} not recorded yet" if missing else "no seed in common")
      lines.append(f"| {label} | {why} | | | | | | | | |")
      continue
    cells = []
    for key in ("final", "last3"):
      s = pair[key]
      ci = ("n/a" if s["ci95"] is None else
            f"{_pp(s['mean'] - s['ci95'])} to {_pp(s['mean'] + s['ci95'])}")
      cells += [_pp(s["mean"]), _pp(s["se"], sign=False), ci,
                f"{_pp(s['min'])} to {_pp(s['max'])}"]
    lines.append(f"| {label} | {', '.join(map(str, pair['seeds']))} ({len(pair['seeds'])}) | "
                 + " | ".join(cells) + " |")
  return lines


def _per_run_lines(runs: list[Run], variants: list[str]) -> list[str]:
  """One row per run: accuracies, time to each threshold, img/s, other processes' CPU."""
  lines = ["", "## Per run", "",
           f"img/s: summary.json's steps x batch / training seconds. Other CPU: share of the "
           f"machine's CPU time used by other processes during the run; above "
           f"{100 * SHARED_CPU:g}% the run's times are marked \"machine shared\" (its "
           f"accuracy is unaffected, its times are inflated).",
           "",
           "| run | seed | final | last-3 | best (step) | "
           + " | ".join(f"to {100 * t:g}%" for t in THRESHOLDS)
           + " | img/s | other CPU |",
           "|---|---:|---:|---:|---:|" + "---|" * len(THRESHOLDS) + "---:|---:|"]
  for v in variants:
    for r in _by_seed(runs, v):
      share = r.summary.get("other_cpu_share")
      shared = (f"{100 * share:.0f}%" + (" machine shared" if share > SHARED_CPU else "")
                if share is not None else "n/a")
      accuracy, step = r.best
      lines.append(f"| {r.name} | {r.seed} | {_pct(r.final)} | {_pct(r.last3)} | "
                   f"{_pct(accuracy)} ({step}) | "
                   + " | ".join(_reach_cell(r, t) for t in THRESHOLDS)
                   + f" | {r.summary.get('images_per_second', 'n/a')} | {shared} |")
  return lines


def _reproduce_lines(runs: list[Run], variants: list[str], command: str) -> list[str]:
  """The report's own command and each run's."""
  lines = ["## Reproduce", "", "This file and curves.png, from the records alone:", "",
           "```bash", command, "```", "",
           "Each run (summary.json's command; `python benchmarks/study.py train` runs the "
           "missing ones and records them):", "", "```bash"]
  lines += [str(r.summary.get("command", f"# {r.name}: no command recorded"))
            for v in variants for r in _by_seed(runs, v)]
  return lines + ["```", ""]


def render_markdown(runs: list[Run], analysis: dict, problems: list[str], *,
                    command: str) -> str:
  """results.md: header, per variant, paired differences, per run, curves, problems with
  the records (if any) and how to reproduce it all; ``command`` regenerates the report."""
  lines = ["# Study: cifar_resnet20 with none / se / ms_sar on CIFAR-10", ""]
  if not runs:
    return "\n".join(lines + ["No recorded runs yet.", "", f"Regenerate: `{command}`", ""])
  variants = analysis["variants"]
  lines += _header_lines(runs)
  lines += _per_variant_lines(runs, analysis)
  lines += _paired_lines(analysis)
  lines += _per_run_lines(runs, variants)
  lines += ["", "![Test accuracy and train loss per epoch](curves.png)", "",
            "Curves: mean over seeds, band from the lowest to the highest seed.", ""]
  if problems:
    lines += ["## Problems with the records", ""] + [f"- {p}" for p in problems] + [""]
  lines += _reproduce_lines(runs, variants, command)
  return "\n".join(lines)


_COLORS = {"none": "tab:gray", "se": "tab:blue", "ms_sar": "tab:red"}
_EXTRA_COLORS = ("tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive")


def _band(series: list[list[tuple[int, float]]]):
  """Steps, mean, min, max over the runs having each step."""
  values = {}
  for points in series:
    for step, value in points:
      values.setdefault(step, []).append(value)
  steps = sorted(values)
  return (steps, [statistics.fmean(values[s]) for s in steps],
          [min(values[s]) for s in steps], [max(values[s]) for s in steps])


def curves_figure(runs: list[Run]):
  """Test accuracy and train loss against epochs per variant: mean over seeds, min-max band;
  an inset enlarges the test accuracy from the first lr drop on."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(11.0, 4.5), layout="constrained")
  acc_ax, loss_ax = fig.subplots(1, 2)
  per_epoch, _, _, drops = _steps(runs[0].config) if runs else (1, 0, 0, [])
  zoom_from = drops[0] / per_epoch if drops else None
  zoom = acc_ax.inset_axes([0.42, 0.07, 0.55, 0.5]) if zoom_from is not None else None
  zoom_values = []
  extra = iter(_EXTRA_COLORS * 4)
  for v in variant_order(runs):
    rs = [r for r in runs if r.variant == v]
    color = _COLORS.get(v) or next(extra)
    label = f"{v} ({len(rs)} seed{'s' if len(rs) > 1 else ''})"
    for ax, attr, scale in ((acc_ax, "evals", 100.0), (zoom, "evals", 100.0),
                            (loss_ax, "losses", 1.0)):
      if ax is None:
        continue
      epochs, mean, low, high = _band([[(s / r.steps_per_epoch, x * scale)
                                        for s, x in getattr(r, attr)] for r in rs])
      ax.plot(epochs, mean, color=color, label=label, marker="." if attr == "evals" else None)
      if len(rs) > 1:
        ax.fill_between(epochs, low, high, color=color, alpha=0.2, linewidth=0)
      if ax is zoom:
        zoom_values += [x for e, lo, hi in zip(epochs, low, high) if e >= zoom_from
                        for x in (lo, hi)]
  for ax in (acc_ax, zoom):
    for t in THRESHOLDS if ax is not None else ():
      ax.axhline(100 * t, color="black", linewidth=0.6, linestyle=":")
  for t in THRESHOLDS:
    acc_ax.annotate(f"{100 * t:g}%", (0, 100 * t), xycoords=("axes fraction", "data"),
                    xytext=(2, 2), textcoords="offset points", fontsize=8)
  for ax in (acc_ax, loss_ax, zoom):
    for i, step in enumerate(drops if ax is not None else ()):
      ax.axvline(step / per_epoch, color="black", linewidth=0.6, linestyle="--",
                 label="lr drop" if i == 0 else None)
  if zoom is not None and zoom_values:
    last = max(r.evals[-1][0] / r.steps_per_epoch for r in runs)
    low, high = min(zoom_values), max(zoom_values)
    pad = max(0.1 * (high - low), 0.2)
    zoom.set_xlim(zoom_from - 0.02 * (last - zoom_from), last + 0.03 * (last - zoom_from))
    zoom.set_ylim(low - pad, high + pad)
    zoom.tick_params(labelsize=7)
    zoom.grid(alpha=0.3)
    zoom.set_title("from the first lr drop", fontsize=8)
  acc_ax.set(xlabel="epoch", ylabel="test accuracy (%)",
             title="Test accuracy (mean over seeds, min-max band)")
  loss_ax.set(xlabel="epoch", ylabel="train loss", title="Train loss (mean, min-max band)")
  acc_ax.grid(alpha=0.3)
  loss_ax.grid(alpha=0.3)
  loss_ax.legend()
  if zoom is None:
    acc_ax.legend()
  return fig


def report(args) -> int:
  runs, problems = load_runs(args.runs)
  analysis = analyse(runs)
  command = "python benchmarks/study.py report" + "".join(
      f" --{k} {shlex.quote(_shown(getattr(args, k)))}"
      for k, default in (("runs", DEFAULT_RUNS), ("out", DEFAULT_OUT))
      if os.path.abspath(getattr(args, k)) != os.path.abspath(default))
  text = render_markdown(runs, analysis, problems, command=command)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
    f.write(text)
  fig = curves_figure(runs)
  fig.savefig(os.path.join(args.out, "curves.png"), dpi=100)
  print(f"study: {len(runs)} run(s) reported in {os.path.join(args.out, 'results.md')} and "
        f"curves.png", flush=True)
  for p in problems:
    print(f"study: {p}", file=sys.stderr)
  return 0


# ---------------------------------------------------------------------------------------------
# Command line: `train` or `report`, then absl flags (one set for both commands)
# ---------------------------------------------------------------------------------------------

COMMANDS = ("train", "report")
CONFIG = "cifar10,cifar_resnet20,ms_sar"  # --config's keys and types: this variant's config


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, *, config: bool = True,
                 sys_argv: Sequence[str] | None = None) -> None:
  """The study's flags, in ``flag_values``. ``config``: also ``--config.<key>`` (train.py's
  config keys; loading that config imports JAX, which ``report`` never needs). ``sys_argv``:
  the command line that the ``--config.<key>`` overrides are read from (default: sys.argv)."""
  fv = {"flag_values": flag_values}
  flags.DEFINE_string("data_dir", None, "train: TFDS data_dir holding cifar10 (required).",
                      **fv)
  flags.DEFINE_string("runs", None, "train: where the run workdirs (checkpoints) go "
                      "(required). report: the recorded runs, train's --out (default "
                      f"{_shown(DEFAULT_RUNS)}).", **fv)
  flags.DEFINE_string("out", None, "train: where finished runs are recorded (default "
                      f"{_shown(DEFAULT_RUNS)}). report: where results.md and curves.png go "
                      f"(default {_shown(DEFAULT_OUT)}).", **fv)
  flags.DEFINE_integer("epochs", 15, "train: epochs of each run.", **fv)
  flags.DEFINE_string("seeds", "0,1,2", "train: comma list of seeds.", **fv)
  flags.DEFINE_string("variants", ",".join(VARIANTS), "train: comma list of variants.", **fv)
  flags.DEFINE_string("suffix", "", "train: added to the variant in run names.", **fv)
  flags.DEFINE_boolean("commit", False, "train: git commit each run's record.", **fv)
  if config:
    from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
    from mssar_jax.configs import cifar  # pylint: disable=import-outside-toplevel  (JAX)
    config_flags.DEFINE_config_dict(
        "config", cifar.get_config(CONFIG),
        "train: a train.py config key for every run, e.g. --config.num_train_steps=8 "
        "--config.model_kwargs.depth=8; each one given is passed on to train.py after the "
        "tool's own settings (eval/log/checkpoint cadence), so it wins.",
        sys_argv=None if sys_argv is None else list(sys_argv), **fv)


def command_of(argv: Sequence[str]) -> str | None:
  """The first positional argument of ``argv`` (argv[0]: the program), or None."""
  scratch = flags.FlagValues()
  define_flags(scratch, config=False)
  try:
    rest = scratch(list(argv), known_only=True)  # --config.<key> left in rest
  except flags.Error:
    return None
  positional = [a for a in rest[1:] if not a.startswith("-")]
  return positional[0] if positional else None


def _flag_text(value) -> str:
  """A config value as train.py's command line spells it (strings bare, the rest literals)."""
  return value if isinstance(value, str) else repr(value)


def config_overrides(flag_values: flags.FlagValues) -> list[tuple[str, object]]:
  """(key, value) of each --config.<key> given on the command line, in its order."""
  config = flag_values["config"].value
  keys = [name.split(".", 1)[1] for name in flag_values
          if name.startswith("config.") and flag_values[name].present]
  return [(key, functools.reduce(getattr, key.split("."), config)) for key in keys]


def run_command(flag_values: flags.FlagValues, positional: Sequence[str]) -> int:
  """Runs ``train`` or ``report`` (``positional``: the arguments left after the flags)."""
  if len(positional) != 1 or positional[0] not in COMMANDS:
    raise app.UsageError(f"give one command, train or report (got {list(positional)})")
  names = ("data_dir", "runs", "out", "epochs", "seeds", "variants", "suffix", "commit")
  args = types.SimpleNamespace(command=positional[0],
                               **{n: flag_values[n].value for n in names})
  if args.command == "train":
    missing = [f"--{n}" for n in ("data_dir", "runs") if not getattr(args, n)]
    if missing:
      raise app.UsageError(f"train needs {' and '.join(missing)}")
    args.out = args.out or DEFAULT_RUNS
    args.config_overrides = config_overrides(flag_values)
    return train(args)
  args.runs = args.runs or DEFAULT_RUNS
  args.out = args.out or DEFAULT_OUT
  return report(args)


def main(argv: Sequence[str] | None = None) -> int:
  """The command line ``argv`` (the arguments after the program name; default: sys.argv's),
  parsed into a flag set of its own: callable from Python, several calls side by side."""
  argv = ["study.py", *(sys.argv[1:] if argv is None else argv)]
  flag_values = flags.FlagValues()
  try:
    define_flags(flag_values, config=command_of(argv) != "report", sys_argv=argv)
    rest = flag_values(argv)
    return run_command(flag_values, rest[1:])
  except (flags.Error, app.UsageError) as e:
    print(f"study: {e}", file=sys.stderr)
    return 2
  except (AttributeError, KeyError) as e:  # config_flags on an unknown --config.<key>
    print(f"study: unknown --config key {str(e).strip(chr(34) + chr(39))!r}; --helpfull "
          "lists them", file=sys.stderr)
    return 2


def _app_main(argv) -> int:
  return run_command(flags.FLAGS, argv[1:])


if __name__ == "__main__":
  try:
    define_flags(config=command_of(sys.argv) != "report")  # reads the --config.<key> given
  except (AttributeError, KeyError) as error:
    sys.exit(f"study: unknown --config key {str(error).strip(chr(34) + chr(39))!r}; "
             "--helpfull lists them")
  app.run(_app_main)
