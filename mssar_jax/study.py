r"""The real-data study: none / se / ms_sar on the same schedule, several seeds, one table.

    # train the 6 runs one after the other (a finished run is skipped, an interrupted one
    # resumes), then write the table and the curves:
    python -m mssar_jax.study --data_dir ../shared/data/tfds --steps 2000 --seeds 0,1 \
        --runs runs/study --out docs/study
    # rebuild docs/study/results.md and curves.png from the existing workdirs only:
    python -m mssar_jax.study --runs runs/study --out docs/study --report_only
    # pick --steps so that the slowest variant fits a time budget (times a short ms_sar run):
    python -m mssar_jax.study --data_dir ../shared/data/tfds --minutes 15 --seeds 0,1 ...

Every run is ``configs/cifar.py:<dataset>,<model>,<variant>,local`` with
``num_train_steps=--steps`` (the lr schedule, /10 at 50% and 75%, follows), ``seed``, evaluation
on the whole test split ``--evals`` times (evenly spaced, the last at the end), one checkpoint
at the end, plus any ``--set key=value`` overrides; it runs in this process through
``mssar_jax.train.train_and_evaluate`` in ``<runs>/<variant>_seed<seed>``.

The report (``<out>/results.md``, ``<out>/curves.png``) reads only the workdirs: final test
accuracy (the last ``eval/accuracy`` of ``metrics.jsonl``), training throughput (the last
``perf/images_per_second`` in TensorBoard: images per second of training since the first
step of the run's last session, compilation and evaluations excluded) and trainable
parameters (from the config, no checkpoint needed). Per variant: mean and sample standard
deviation (ddof 1) over seeds, and the range.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import shlex
import sys
import time
from typing import Any, Sequence

import numpy as np

from mssar_jax.errors import ConfigError

VARIANTS = ("none", "se", "ms_sar")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STATE_FILE = "study.json"


def _configs_module():
  """``configs.cifar`` of the repository (configs/ lives next to the package)."""
  if os.path.isdir(os.path.join(_ROOT, "configs")) and _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
  from configs import cifar  # pylint: disable=import-outside-toplevel
  return cifar


def parse_set(items: Sequence[str]) -> dict[str, Any]:
  """['model_kwargs.depth=8', 'data_dir=/x'] -> {'model_kwargs.depth': 8, 'data_dir': '/x'}."""
  out = {}
  for item in items:
    if "=" not in item:
      raise ConfigError(f"--set {item!r}: use key=value, e.g. --set model_kwargs.depth=8.")
    key, text = item.split("=", 1)
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    out[key.strip()] = value
  return out


def _assign(config, key: str, value) -> None:
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    node = node[p]
  if leaf not in node:
    raise ConfigError(f"--set {key}: no such config key.")
  node[leaf] = value


def run_config(variant: str, seed: int, *, steps: int, base: str = "cifar10,cifar_resnet20",
               data_dir: str | None = None, evals: int = 4,
               overrides: dict[str, Any] | None = None):
  """The config of one study run (see the module docstring)."""
  if variant not in VARIANTS:
    raise ConfigError(f"unknown variant {variant!r}; use {', '.join(VARIANTS)}.")
  config = _configs_module().get_config(f"{base},{variant},local")
  config.num_train_steps = int(steps)
  config.seed = int(seed)
  if data_dir is not None:
    config.data_dir = data_dir
  config.eval_every_steps = max(steps // evals, 1) if evals > 0 else 0
  config.checkpoint_every_steps = 0        # once, at the end
  config.keep_checkpoints = 1
  config.eval_batch_size = 1000
  config.log_every_steps = max(1, min(50, steps // 20))
  for key, value in (overrides or {}).items():
    _assign(config, key, value)
  return config


def _overrides_as_flags(config, variant_config_words: str, workdir: str) -> str:
  """An equivalent ``python train.py`` command line for one run."""
  parts = ["python train.py", f"--config configs/cifar.py:{variant_config_words}",
           f"--workdir {shlex.quote(workdir)}"]
  base = _configs_module().get_config(variant_config_words)
  flat_new, flat_old = _flatten(config.to_dict()), _flatten(base.to_dict())
  for key in sorted(flat_new):
    if flat_new[key] != flat_old.get(key):
      parts.append(f"--config.{key}={shlex.quote(str(flat_new[key]))}")
  return " ".join(parts)


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
  return out


def workdir_of(runs: str, variant: str, seed: int) -> str:
  return os.path.join(runs, f"{variant}_seed{seed}")


def finished(workdir: str, steps: int) -> bool:
  """Whether the workdir's metrics end with an evaluation at step ``steps``."""
  from mssar_jax import plot  # pylint: disable=import-outside-toplevel
  try:
    records = plot.read_run(workdir)["records"]
  except ConfigError:
    return False
  return bool(records) and records[-1].get("step") == steps and "eval/accuracy" in records[-1]


def train_all(*, runs: str, variants: Sequence[str], seeds: Sequence[int], steps: int,
              base: str, data_dir: str | None, evals: int, overrides: dict[str, Any],
              command: str = "") -> list[str]:
  """Trains every (variant, seed) not yet finished, one after the other; returns workdirs."""
  from mssar_jax import train  # pylint: disable=import-outside-toplevel
  os.makedirs(runs, exist_ok=True)
  import jax  # pylint: disable=import-outside-toplevel
  import platform  # pylint: disable=import-outside-toplevel
  state = {"command": command, "steps": steps, "base": base, "variants": list(variants),
           "seeds": list(seeds), "evals": evals, "overrides": overrides, "runs": {},
           "machine": {"cpu_count": os.cpu_count(), "devices": jax.device_count(),
                       "platform": jax.devices()[0].platform, "jax": jax.__version__,
                       "python": platform.python_version(), "processor": platform.machine()}}
  state_path = os.path.join(runs, _STATE_FILE)
  if os.path.isfile(state_path):
    with open(state_path, encoding="utf-8") as f:
      previous = json.load(f)
    if previous.get("steps") not in (None, steps) or previous.get("base", base) != base:
      raise ConfigError(f"{runs} holds a study of {previous.get('base')} with "
                        f"{previous.get('steps')} steps; pass the same --steps/--base or a new "
                        "--runs directory.")
    state["runs"] = previous.get("runs", {})
  workdirs = []
  configs = [(v, s, run_config(v, s, steps=steps, base=base, data_dir=data_dir, evals=evals,
                               overrides=overrides)) for s in seeds for v in variants]
  for variant, seed, config in configs:  # all configs are built (and checked) first
    workdir = workdir_of(runs, variant, seed)
    workdirs.append(workdir)
    name = os.path.basename(workdir)
    if finished(workdir, steps):
      print(f"study: {name} already finished; skipped", flush=True)
      continue
    print(f"study: training {name} ({steps} steps)", flush=True)
    started = time.time()
    result = train.train_and_evaluate(config, workdir)
    if result.get("preempted"):
      raise KeyboardInterrupt(f"{name} was stopped; run the same command again to resume.")
    state["runs"][name] = {
        "wall_seconds": round(time.time() - started, 1),
        "train_command": _overrides_as_flags(config, f"{base},{variant},local", workdir),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    with open(state_path, "w", encoding="utf-8") as f:
      json.dump(state, f, indent=2, sort_keys=True)
  return workdirs


# ---------------------------------------------------------------------------------------------
# Report.

def images_per_second(workdir: str) -> float | None:
  """The last ``perf/images_per_second`` TensorBoard value of the run, or None."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
  from tensorboard.util import tensor_util  # pylint: disable=import-outside-toplevel
  path = os.path.join(workdir, "tensorboard")
  if not os.path.isdir(path):
    return None
  acc = event_accumulator.EventAccumulator(
      path, size_guidance={event_accumulator.TENSORS: 0, event_accumulator.SCALARS: 0})
  acc.Reload()
  tag = "perf/images_per_second"
  if tag in acc.Tags().get("tensors", []):
    events = acc.Tensors(tag)
    value = lambda e: float(tensor_util.make_ndarray(e.tensor_proto))
  elif tag in acc.Tags().get("scalars", []):
    events = acc.Scalars(tag)
    value = lambda e: float(e.value)
  else:
    return None
  values = [value(e) for e in sorted(events, key=lambda e: (e.step, e.wall_time))]
  values = [v for v in values if v > 0]
  return values[-1] if values else None


def count_parameters(workdir: str) -> int:
  """Trainable parameters of the run's network (from config.json; nothing is restored)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from mssar_jax import models  # pylint: disable=import-outside-toplevel
  from mssar_jax import trained  # pylint: disable=import-outside-toplevel
  from mssar_jax import train  # pylint: disable=import-outside-toplevel
  config = trained.read_config(workdir)
  num_classes = trained._NUM_CLASSES[config.dataset]  # pylint: disable=protected-access
  size = int(config.get("image_size", 0) or models.input_size(config.model))
  model = train.create_model(config, num_classes)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, size, size, 3)), train=False))
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes["params"])))


def collect(workdirs: Sequence[str]) -> list[dict[str, Any]]:
  """One row per workdir: variant, seed, steps, final accuracy/loss, img/s, parameters."""
  from mssar_jax import plot  # pylint: disable=import-outside-toplevel
  rows = []
  for w in workdirs:
    run = plot.read_run(w)
    c = run["config"]
    evals = [r for r in run["records"] if "eval/accuracy" in r]
    losses = [r for r in run["records"] if "train/loss" in r]
    if not evals:
      raise ConfigError(f"{w} has no evaluation yet (metrics.jsonl); train it first.")
    rows.append({
        "workdir": w, "variant": c.get("recalibration", "?"), "seed": c.get("seed"),
        "model": c.get("model", "?"), "dataset": c.get("dataset", "?"),
        "steps": evals[-1]["step"], "num_train_steps": c.get("num_train_steps"),
        "batch_size": c.get("batch_size"),
        "schedule": (c.get("lr_schedule"), c.get("learning_rate"), c.get("lr_boundaries"),
                     c.get("lr_decay_factor"), c.get("warmup_steps")),
        "accuracy": float(evals[-1]["eval/accuracy"]),
        "num_examples": evals[-1].get("eval/num_examples"),
        "train_loss": float(losses[-1]["train/loss"]) if losses else float("nan"),
        "images_per_second": images_per_second(w),
        "parameters": count_parameters(w)})
  return rows


def summarise(rows: Sequence[dict]) -> list[dict[str, Any]]:
  """Per variant (in VARIANTS order): n, mean, std (ddof 1), min, max, img/s, parameters."""
  order = {v: i for i, v in enumerate(VARIANTS)}
  out = []
  for variant in sorted({r["variant"] for r in rows}, key=lambda v: (order.get(v, 99), v)):
    mine = [r for r in rows if r["variant"] == variant]
    acc = np.array([r["accuracy"] for r in mine])
    ips = [r["images_per_second"] for r in mine if r["images_per_second"]]
    out.append({"variant": variant, "n": len(mine), "seeds": sorted(r["seed"] for r in mine),
                "mean": float(acc.mean()), "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                "min": float(acc.min()), "max": float(acc.max()),
                "images_per_second": float(np.mean(ips)) if ips else None,
                "parameters": mine[0]["parameters"]})
  return out


def _pct(x: float) -> str:
  return f"{100 * x:.2f}%"


def write_report(workdirs: Sequence[str], out: str, *, runs_dir: str | None = None,
                 report_command: str = "") -> str:
  """Writes ``<out>/results.md`` and ``<out>/curves.png``; returns the markdown path."""
  from mssar_jax import plot  # pylint: disable=import-outside-toplevel
  rows = collect(workdirs)
  summary = summarise(rows)
  os.makedirs(out, exist_ok=True)
  curves = plot.plot_runs(list(workdirs), os.path.join(out, "curves.png"),
                          color_by="recalibration",
                          title=f"{rows[0]['model']} on {rows[0]['dataset']}: "
                                f"{', '.join(s['variant'] for s in summary)}")
  state = {}
  if runs_dir and os.path.isfile(os.path.join(runs_dir, _STATE_FILE)):
    with open(os.path.join(runs_dir, _STATE_FILE), encoding="utf-8") as f:
      state = json.load(f)
  base_params = next((s["parameters"] for s in summary if s["variant"] == "none"), None)
  same = {k: sorted({repr(r[k]) for r in rows}) for k in ("steps", "schedule", "batch_size",
                                                           "model", "dataset")}
  lines = [f"# Study: {rows[0]['model']} with {' / '.join(s['variant'] for s in summary)} on "
           f"{rows[0]['dataset']}", ""]
  mismatched = [k for k, v in same.items() if len(v) > 1]
  machine = state.get("machine")
  where = (f"Trained on a {machine['cpu_count']}-core {machine['processor']} machine with "
           f"{machine['devices']} JAX {machine['platform']} device(s), jax {machine['jax']}, "
           f"Python {machine['python']}, one run after the other."
           if machine else "Machine: not recorded (the runs were not trained by this command).")
  lines.append(
      f"{len(rows)} run{'s' if len(rows) != 1 else ''}, {rows[0]['steps']} steps of batch "
      f"{rows[0]['batch_size']} each (same lr schedule), test accuracy on "
      f"{rows[0]['num_examples']} test images at the last step. {where} Report written "
      f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; each run's full "
      "config is its workdir's config.json.")
  if mismatched:
    lines += ["", f"**Warning: the runs differ in {', '.join(mismatched)}** "
              f"({'; '.join(f'{k}: ' + ' vs '.join(same[k]) for k in mismatched)})."]
  lines += ["", "| variant | seeds | test accuracy (mean ± std) | range | train img/s | "
            "parameters | +params vs none |", "|---|---|---:|---:|---:|---:|---:|"]
  for s in summary:
    ips = f"{s['images_per_second']:.0f}" if s["images_per_second"] else "n/a"
    extra = (f"{100 * (s['parameters'] / base_params - 1):+.2f}%" if base_params else "n/a")
    lines.append(f"| {s['variant']} | {', '.join(map(str, s['seeds']))} | "
                 f"{_pct(s['mean'])} ± {_pct(s['std']) if s['n'] > 1 else 'n/a (1 seed)'} | "
                 f"{_pct(s['min'])} - {_pct(s['max'])} | "
                 f"{ips} | {s['parameters']:,} | {extra} |")
  lines += ["", "Per run:", "", "| workdir | variant | seed | test accuracy | final train loss | "
            "train img/s | wall |", "|---|---|---:|---:|---:|---:|---:|"]
  for r in sorted(rows, key=lambda r: (r["variant"], r["seed"])):
    name = os.path.basename(os.path.normpath(r["workdir"]))
    wall = state.get("runs", {}).get(name, {}).get("wall_seconds")
    ips = f"{r['images_per_second']:.0f}" if r["images_per_second"] else "n/a"
    lines.append(f"| {name} | {r['variant']} | {r['seed']} | {_pct(r['accuracy'])} | "
                 f"{r['train_loss']:.3f} | {ips} | "
                 f"{f'{wall / 60:.1f} min' if wall else 'n/a'} |")
  rel = os.path.relpath(curves, out)
  lines += ["", f"![curves]({rel})", "",
            "Spread: sample standard deviation over seeds (ddof 1) and the range. Train img/s: "
            "the run's last `perf/images_per_second` (training since its first step, "
            "compilation and evaluations excluded), averaged over seeds. Parameters: "
            "trainable, counted from the config.", "", "Reproduce:", "", "```bash"]
  if state.get("command"):
    lines.append(state["command"])
  if report_command:
    lines.append(report_command)
  lines.append("```")
  commands = [v["train_command"] for k, v in sorted(state.get("runs", {}).items())
              if "train_command" in v]
  if commands:
    lines += ["", "Each run alone (the same configs through `train.py`):", "", "```bash",
              *commands, "```"]
  path = os.path.join(out, "results.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return path


def discover(runs: str) -> list[str]:
  """The workdirs under ``runs`` (directories holding metrics.jsonl), sorted by name."""
  if not os.path.isdir(runs):
    raise ConfigError(f"--runs {runs} does not exist; train first (without --report_only).")
  found = sorted(os.path.join(runs, d) for d in os.listdir(runs)
                 if os.path.isfile(os.path.join(runs, d, "metrics.jsonl")))
  if not found:
    raise ConfigError(f"no workdirs with metrics.jsonl under {runs}.")
  return found


def _scalar_events(workdir: str, tag: str) -> list[tuple[int, float, float]]:
  """(step, wall_time, value) of one TensorBoard tag of the run, sorted by step."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
  from tensorboard.util import tensor_util  # pylint: disable=import-outside-toplevel
  acc = event_accumulator.EventAccumulator(
      os.path.join(workdir, "tensorboard"), size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  if tag not in acc.Tags().get("tensors", []):
    return []
  return sorted((e.step, e.wall_time, float(tensor_util.make_ndarray(e.tensor_proto)))
                for e in acc.Tensors(tag))


def eval_seconds(workdir: str, batch_size: int, ips: float) -> float | None:
  """Seconds of one evaluation, from the TensorBoard wall times around the first eval record:
  (wall of the eval step's record - wall of the previous record) - the training between."""
  evals = _scalar_events(workdir, "eval/accuracy")
  logs = _scalar_events(workdir, "train/loss")
  if not evals:
    return None
  step, wall, _ = evals[0]
  before = [(s, w) for s, w, _ in logs if s < step]
  if not before:
    return None
  prev_step, prev_wall = before[-1]
  return max(0.0, (wall - prev_wall) - (step - prev_step) * batch_size / ips)


def calibrate_steps(minutes: float, *, base: str, data_dir: str | None,
                    overrides: dict[str, Any], batch_size: int, calibration_steps: int = 60,
                    evals: int = 4) -> int:
  """Steps of ms_sar (the slowest variant) that fit ``minutes`` with ``evals`` evaluations.

  A ``calibration_steps`` run of ms_sar (evaluated twice) gives the training rate (img/s),
  one evaluation's time (TensorBoard wall times) and the one-off cost (start-up, data
  loading, compilation: wall time - training - evaluations); then
  steps = (minutes - one-off - evals x evaluation) x img/s / batch, rounded down to 50.
  """
  import tempfile  # pylint: disable=import-outside-toplevel
  from mssar_jax import train  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as tmp:
    config = run_config("ms_sar", 0, steps=calibration_steps, base=base, data_dir=data_dir,
                        evals=2, overrides=overrides)
    started = time.time()
    train.train_and_evaluate(config, tmp)
    wall = time.time() - started
    ips = images_per_second(tmp) or 1.0
    evaluation = eval_seconds(tmp, batch_size, ips)
  evaluation = evaluation if evaluation is not None else 0.0
  training = calibration_steps * batch_size / ips
  fixed = max(wall - training - 2 * evaluation, 0.0)
  budget = minutes * 60 - fixed - evals * evaluation
  steps = int(budget * ips / batch_size)
  steps = max(50, steps - steps % 50)
  print(f"study: ms_sar trains at {ips:.0f} img/s, an evaluation takes {evaluation:.0f} s, "
        f"start-up and compilation {fixed:.0f} s: {steps} steps with {evals} evaluations fit "
        f"{minutes:g} minutes", flush=True)
  return steps


def _with_steps(argv: Sequence[str], steps: int) -> str:
  """The study command line with ``--minutes M`` replaced by the ``--steps`` it chose."""
  out, skip = [], False
  for a in argv:
    if skip:
      skip = False
      continue
    if a == "--minutes":
      skip = True
      out += ["--steps", str(steps)]
    elif a.startswith("--minutes="):
      out += ["--steps", str(steps)]
    else:
      out.append(a)
  return "python -m mssar_jax.study " + " ".join(shlex.quote(a) for a in out)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m mssar_jax.study",
      description="none / se / ms_sar on the same schedule and seeds; results.md + curves.png.")
  parser.add_argument("--data_dir", default=None, help="TFDS data_dir holding the dataset")
  parser.add_argument("--steps", type=int, default=None, help="training steps of every run")
  parser.add_argument("--minutes", type=float, default=None,
                      help="instead of --steps: fit the slowest variant into this many minutes")
  parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help="comma-separated recalibrations (default none,se,ms_sar)")
  parser.add_argument("--base", default="cifar10,cifar_resnet20",
                      help="dataset and model words of configs/cifar.py")
  parser.add_argument("--evals", type=int, default=4,
                      help="evaluations per run, evenly spaced (default 4)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override for every run, e.g. batch_size=128 (repeatable)")
  parser.add_argument("--runs", default="runs/study", help="root of the run workdirs")
  parser.add_argument("--out", default="docs/study", help="where results.md and curves.png go")
  parser.add_argument("--report_only", action="store_true",
                      help="only rebuild the report from the workdirs under --runs")
  args = parser.parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  command = "python -m mssar_jax.study " + " ".join(
      shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
  report_command = (f"python -m mssar_jax.study --runs {shlex.quote(args.runs)} "
                    f"--out {shlex.quote(args.out)} --report_only")
  try:
    if args.report_only:
      workdirs = discover(args.runs)
    else:
      variants = [v.strip() for v in args.variants.split(",") if v.strip()]
      seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
      overrides = parse_set(args.set)
      steps = args.steps
      if steps is None:
        if args.minutes is None:
          raise ConfigError("pass --steps N (or --minutes M to fit a time budget), or "
                            "--report_only.")
        probe = run_config("ms_sar", 0, steps=1, base=args.base, data_dir=args.data_dir,
                           overrides=overrides)
        steps = calibrate_steps(args.minutes, base=args.base, data_dir=args.data_dir,
                                overrides=overrides, batch_size=probe.batch_size,
                                evals=args.evals)
        command = _with_steps(sys.argv[1:] if argv is None else list(argv), steps)
      workdirs = train_all(runs=args.runs, variants=variants, seeds=seeds, steps=steps,
                           base=args.base, data_dir=args.data_dir, evals=args.evals,
                           overrides=overrides, command=command)
    path = write_report(workdirs, args.out, runs_dir=args.runs, report_command=report_command)
  except ConfigError as e:
    print(f"study: {e}", file=sys.stderr)
    return 1
  print(path)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
