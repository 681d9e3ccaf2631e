"""Speed benchmark: train/eval throughput of none / se / ms_sar, compile time, parameters,
memory, the CIFAR-10 input pipeline, and (optionally) a PyTorch reference, in one run.

    python -m mssar_jax.bench                                  # cifar_resnet56, batch 128
    python -m mssar_jax.bench --torch-python /work/torch_venv/bin/python --compile
    python -m mssar_jax.bench --quick                          # CI smoke run (< 2 minutes)

Everything that is compared is measured side by side: after one untimed round, every round
times ``--steps`` train steps of each arm in turn (none, se, ms_sar, the PyTorch subprocess,
...), so load from other processes hits all arms alike; the table reports medians over
rounds, and ratios are the medians of the per-round ratios. Wall time is what counts; process CPU time per step is
reported too (less sensitive to other jobs on a shared machine).

The train step is the trainer's own ``train.train_step``: forward in train mode with BatchNorm updates, softmax
cross-entropy, gradients, SGD momentum 0.9 with coupled weight decay 1e-4 (``optim``), state
donated; one device. Eval is the inference forward pass. ``peak MB`` is XLA's buffer
assignment for the compiled step (arguments + outputs + temporaries - aliased); the process
maximum RSS is reported once. The PyTorch reference (``benchmarks/torch_resnet.py``, run with
the interpreter given by ``--torch-python``; torch is never imported here) is the same
CIFAR ResNet train step, eager, with ``--torch-threads`` threads (default: the CPU count,
which is what XLA:CPU uses). Output: a markdown table on stdout, JSON in ``--json``.
Run as a program it first re-runs itself with the trainer's glibc malloc tunables
(``malloc_tuning``; the PyTorch subprocess inherits them), so it times the step as
``train.py`` runs it.
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import os
import pathlib
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mssar_jax import config_lib
from mssar_jax import malloc_tuning
from mssar_jax import optim
from mssar_jax import train as train_lib
from mssar_jax import xla_flags
from mssar_jax.errors import ConfigError
from mssar_jax.models import get_model, input_size, list_models
from mssar_jax.native import onednn_conv

_ROOT = pathlib.Path(__file__).resolve().parents[1]
TORCH_SCRIPT = _ROOT / "benchmarks" / "torch_resnet.py"
DEFAULT_COMPILE = ("cifar_resnet110:ms_sar", "cifar_densenet_bc100:ms_sar")
GOALS = {"ms_sar_train_ratio_max": 1.10, "ms_sar_params_overhead_max": 0.05,
         "jax_over_torch_min": 1.0, "compile_seconds_max": 30.0, "pipeline_over_train_min": 5.0}


# ---------------------------------------------------------------------------------------------
# JAX arms.

def _trainer_step(model, num_classes: int):
  """The trainer's own jitted train step (``train.train_step``: BatchNorm updates,
  cross-entropy, SGD momentum 0.9 with weight decay 1e-4, donated state) and its optimiser."""
  config = config_lib.base_config()
  config.weight_decay, config.momentum, config.nesterov = 1e-4, 0.9, False
  config.weight_decay_on_bn_and_bias = True
  schedule = optax.constant_schedule(0.1)
  tx = optim.make_optimizer(config, schedule)
  step = functools.partial(train_lib.train_step, model=model, tx=tx, schedule=schedule,
                           num_classes=num_classes, label_smoothing=0.0)
  return jax.jit(step, donate_argnums=(0,)), tx


class Arm:
  """One compiled (model, recalibration) train step and eval forward, timed on demand."""

  def __init__(self, name: str, recalibration: str, batch_size: int, seed: int = 0,
               **model_kwargs):
    self.name, self.recalibration, self.batch_size = name, recalibration, batch_size
    size = input_size(name)
    num_classes = 1000 if size == 224 else 10
    model = get_model(name, num_classes=num_classes, recalibration=recalibration, **model_kwargs)
    train_step, tx = _trainer_step(model, num_classes)

    def eval_step(params, batch_stats, images):
      return model.apply({"params": params, "batch_stats": batch_stats}, images, train=False)

    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.standard_normal((batch_size, size, size, 3), np.float32))
    labels = jnp.asarray(rng.integers(0, num_classes, batch_size).astype(np.int32))
    self._batch = {"image": images, "label": labels}
    state = train_lib.init_state(jax.random.key(seed), model, tx, size)
    self.params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state.params))
    start = time.perf_counter()
    self._train = train_step.lower(state, self._batch).compile()
    self.compile_seconds = time.perf_counter() - start
    self.peak_bytes = _peak_bytes(self._train)
    self._eval = jax.jit(eval_step).lower(state.params, state.batch_stats, images).compile()
    self._state = state
    self.train_steps(1)  # first run: allocations, thread pools
    self.eval_steps(1)

  def train_steps(self, n: int) -> tuple[float, float]:
    """Runs n train steps; returns (wall, cpu) seconds per step."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
      self._state, metrics = self._train(self._state, self._batch)
    metrics["train/loss"].block_until_ready()
    return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n

  def eval_steps(self, n: int) -> tuple[float, float]:
    params, stats = self._state.params, self._state.batch_stats
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
      out = self._eval(params, stats, self._batch["image"])
    out.block_until_ready()
    return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n


def _peak_bytes(compiled) -> int | None:
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except  (not every backend reports it)
    return None


def compile_seconds(name: str, recalibration: str, batch_size: int) -> tuple[float, float]:
  """Trace + XLA compile time of one train step (the model's default, unrolled blocks):
  (wall seconds, process CPU seconds). XLA compiles mostly on one thread, so on a loaded
  machine the wall time grows while the CPU time does not."""
  size = input_size(name)
  num_classes = 1000 if size == 224 else 10
  model = get_model(name, num_classes=num_classes, recalibration=recalibration)
  train_step, tx = _trainer_step(model, num_classes)
  state = jax.eval_shape(functools.partial(train_lib.init_state, model=model, tx=tx,
                                           image_size=size), jax.random.key(0))
  batch = {"image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32),
           "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
  start, cpu = time.perf_counter(), time.process_time()
  train_step.lower(state, batch).compile()
  return time.perf_counter() - start, time.process_time() - cpu


# ---------------------------------------------------------------------------------------------
# PyTorch reference (subprocess).

class TorchArm:
  """``benchmarks/torch_resnet.py`` in a subprocess, driven line by line."""

  def __init__(self, python: str, depth: int, batch_size: int, threads: int):
    if not TORCH_SCRIPT.exists():
      raise ConfigError(f"--torch-python: {TORCH_SCRIPT} is missing (run from a checkout).")
    cmd = [python, str(TORCH_SCRIPT), "--depth", str(depth), "--batch-size", str(batch_size),
           "--threads", str(threads)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    try:
      self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env)
    except OSError as e:
      raise ConfigError(f"--torch-python {python!r} cannot be started ({e}); pass the python "
                        "of an environment with torch installed.") from e
    line = self._proc.stdout.readline()
    if not line.startswith("ready "):
      err = self._proc.stderr.read().strip().splitlines()
      raise ConfigError(f"the PyTorch reference did not start ({err[-1] if err else 'no output'});"
                        f" check that {python} has torch.")
    self.info = json.loads(line[len("ready "):])
    self.batch_size = batch_size

  def _ask(self, command: str) -> float:
    self._proc.stdin.write(command + "\n")
    self._proc.stdin.flush()
    return float(self._proc.stdout.readline())

  def train_steps(self, n: int) -> tuple[float, float]:
    return self._ask(str(n)), float("nan")

  def eval_steps(self, n: int) -> tuple[float, float]:
    return self._ask(f"eval {n}"), float("nan")

  def close(self):
    self._proc.stdin.close()
    self._proc.wait(timeout=60)


# ---------------------------------------------------------------------------------------------
# Input pipeline.

def pipeline_rate(data_dir: str | None, batch_size: int, batches: int, shuffle_buffer: int,
                  dataset: str = "cifar10") -> dict[str, Any]:
  """img/s of the trainer's augmented CIFAR train stream (after its first batch)."""
  from mssar_jax import input_pipeline  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  tf.config.set_visible_devices([], "GPU")
  config = config_lib.base_config()
  config.dataset, config.data_dir = dataset, data_dir or ""
  config.batch_size, config.shuffle_buffer, config.cache = batch_size, shuffle_buffer, True
  builder = input_pipeline.get_builder(config)
  info = input_pipeline.get_info(config, builder, local_batch=batch_size,
                                 local_eval_batch=batch_size, process_index=0, process_count=1)
  data = input_pipeline.TrainData(config, builder, info, local_batch=batch_size,
                                  process_index=0, process_count=1)
  start = time.perf_counter()
  stream = data.iterate(0)
  first = next(stream)
  warmup = time.perf_counter() - start
  assert first["image"].shape == (batch_size, 32, 32, 3)
  start = time.perf_counter()
  for _ in range(batches):
    next(stream)
  seconds = time.perf_counter() - start
  return {"dataset": dataset, "augmentation": "pad 4, random crop 32, random flip, normalise",
          "batch_size": batch_size, "batches": batches, "shuffle_buffer": shuffle_buffer,
          "first_batch_seconds": warmup, "images_per_second": batches * batch_size / seconds}


# ---------------------------------------------------------------------------------------------
# Running and reporting.

def _median_ratio(a, b):
  return statistics.median(x / y for x, y in zip(a, b))


def run(args) -> dict[str, Any]:
  """Builds the arms, alternates timing rounds, returns the JSON-able results."""
  with onednn_conv.use(args.conv_impl):
    return _run(args)


def _run(args) -> dict[str, Any]:
  conv_impl = onednn_conv.conv_impl()
  print(f"bench: convolutions: {conv_impl}" + (
      f" (oneDNN unavailable: {onednn_conv.unavailable_reason()})"
      if onednn_conv.unavailable_reason() else ""), file=sys.stderr, flush=True)
  model_kwargs = dict(args.set)
  recals = [r for r in args.recalibrations.split(",") if r]
  if "none" not in recals:
    recals.insert(0, "none")
  torch_depth = None
  if args.torch_python:
    m = re.fullmatch(r"cifar_resnet(\d+)", args.torch_model)
    if not m:
      raise ConfigError(f"--torch-model must be a cifar_resnetN (got {args.torch_model!r}).")
    torch_depth = int(m.group(1))
  arms: dict[str, Any] = {}
  for r in recals:
    arms[r] = Arm(args.model, r, args.batch_size, **model_kwargs)
    print(f"bench: compiled {args.model} + {r} in {arms[r].compile_seconds:.1f} s",
          file=sys.stderr, flush=True)
  torch_arm = None
  torch_model = args.torch_model
  if args.torch_python:
    if torch_model != args.model or model_kwargs:
      arms["jax_" + torch_model] = Arm(torch_model, "none", args.batch_size)
    if conv_impl == "onednn":  # also time XLA's own convolutions against PyTorch
      with onednn_conv.use("xla"):
        arms["jax_" + torch_model + "_xla_conv"] = Arm(torch_model, "none", args.batch_size)
    torch_arm = TorchArm(args.torch_python, torch_depth, args.batch_size, args.torch_threads)
    arms["torch_" + torch_model] = torch_arm
    print(f"bench: PyTorch reference ready ({torch_arm.info})", file=sys.stderr, flush=True)

  wall = {k: [] for k in arms}
  cpu = {k: [] for k in arms}
  eval_wall = {k: [] for k in arms}
  order = list(arms)
  # One untimed round first, so every arm has run with all the others' buffers allocated.
  # (Single slow steps, up to 2x, still occur, most often in the first timed round; the
  # per-round medians absorb them.)
  for k in order:
    arms[k].train_steps(1)
    if args.eval:
      arms[k].eval_steps(1)
  for i in range(args.rounds):
    # Alternate the order every round too, so no arm always follows the same one.
    for k in (order if i % 2 == 0 else order[::-1]):
      w, c = arms[k].train_steps(args.steps)
      wall[k].append(w)
      cpu[k].append(c)
      if args.eval:
        eval_wall[k].append(arms[k].eval_steps(args.steps)[0])
  if torch_arm is not None:
    torch_arm.close()

  bs = args.batch_size
  rows = {}
  base = arms["none"]
  for r in recals:
    a = arms[r]
    row = {"params": a.params, "params_overhead": a.params / base.params - 1,
           "compile_seconds": a.compile_seconds, "peak_mb": _mb(a.peak_bytes),
           "train_ms": 1e3 * statistics.median(wall[r]),
           "train_images_per_second": bs / statistics.median(wall[r]),
           "train_ratio_vs_none": _median_ratio(wall[r], wall["none"]),
           "train_cpu_ms": 1e3 * statistics.median(cpu[r]),
           "train_cpu_ratio_vs_none": _median_ratio(cpu[r], cpu["none"]),
           "train_wall_seconds_per_round": wall[r]}
    if args.eval:
      row.update({"eval_images_per_second": bs / statistics.median(eval_wall[r]),
                  "eval_ratio_vs_none": _median_ratio(eval_wall[r], eval_wall["none"])})
    rows[r] = row
  result: dict[str, Any] = {
      "machine": machine_info(),
      "settings": {"model": args.model, "model_kwargs": {k: repr(v) for k, v in model_kwargs.items()},
                   "batch_size": bs, "rounds": args.rounds, "steps_per_round": args.steps,
                   "devices": 1, "dtype": "float32", "compile_batch_size": args.compile_batch_size,
                   "conv_impl": conv_impl, "onednn_unavailable": onednn_conv.unavailable_reason(),
                   "torch_threads": args.torch_threads if args.torch_python else None},
      "train": rows}
  if torch_arm is not None:
    jk, tk = ("jax_" + torch_model if "jax_" + torch_model in arms else "none"), "torch_" + torch_model
    result["torch"] = {
        "model": torch_model, "reference": torch_arm.info,
        "jax_images_per_second": bs / statistics.median(wall[jk]),
        "torch_images_per_second": bs / statistics.median(wall[tk]),
        "jax_speed_over_torch": _median_ratio(wall[tk], wall[jk]),
        "jax_best_round_ms": 1e3 * min(wall[jk]), "torch_best_round_ms": 1e3 * min(wall[tk]),
        "jax_wall_seconds_per_round": wall[jk], "torch_wall_seconds_per_round": wall[tk]}
    xk = "jax_" + torch_model + "_xla_conv"
    if xk in arms:
      result["torch"].update({
          "jax_xla_conv_images_per_second": bs / statistics.median(wall[xk]),
          "jax_xla_conv_speed_over_torch": _median_ratio(wall[tk], wall[xk]),
          "onednn_conv_speed_over_xla_conv": _median_ratio(wall[xk], wall[jk]),
          "jax_xla_conv_wall_seconds_per_round": wall[xk]})
    if args.eval:
      result["torch"].update({
          "jax_eval_images_per_second": bs / statistics.median(eval_wall[jk]),
          "torch_eval_images_per_second": bs / statistics.median(eval_wall[tk]),
          "jax_eval_speed_over_torch": _median_ratio(eval_wall[tk], eval_wall[jk])})
  if args.pipeline:
    try:
      p = pipeline_rate(args.data_dir, bs, args.pipeline_batches, args.shuffle_buffer)
      fastest = max(r["train_images_per_second"] for r in rows.values())
      p["over_fastest_train_step"] = p["images_per_second"] / fastest
      result["pipeline"] = p
    except ConfigError as e:
      result["pipeline"] = {"skipped": str(e)}
  if args.compile:
    result["compile"] = {}
    for spec in args.compile_models:
      name, _, recal = spec.partition(":")
      seconds, cpu_seconds = compile_seconds(name, recal or "none", args.compile_batch_size)
      result["compile"][spec] = seconds
      result.setdefault("compile_cpu", {})[spec] = cpu_seconds
      print(f"bench: compile {spec} (batch {args.compile_batch_size}): {seconds:.1f} s "
            f"({cpu_seconds:.1f} s CPU)", file=sys.stderr, flush=True)
  result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  result["goals"] = goals(result)
  return result


def _mb(n):
  return None if n is None else n / 2**20


def goals(result) -> dict[str, Any]:
  """Each goal of the benchmark with its measured figure and whether it is met."""
  out = {}
  ms = result["train"].get("ms_sar")
  if ms:
    out["ms_sar_train_ratio"] = {"goal": f"<= {GOALS['ms_sar_train_ratio_max']}",
                                 "measured": ms["train_ratio_vs_none"],
                                 "met": ms["train_ratio_vs_none"] <= GOALS["ms_sar_train_ratio_max"]}
    out["ms_sar_params_overhead"] = {"goal": f"<= {GOALS['ms_sar_params_overhead_max']:.0%}",
                                     "measured": ms["params_overhead"],
                                     "met": ms["params_overhead"] <= GOALS["ms_sar_params_overhead_max"]}
  if "torch" in result:
    v = result["torch"]["jax_speed_over_torch"]
    out["jax_over_torch"] = {"goal": f">= {GOALS['jax_over_torch_min']}", "measured": v,
                             "met": v >= GOALS["jax_over_torch_min"]}
  for spec, seconds in result.get("compile", {}).items():
    out[f"compile {spec}"] = {"goal": f"< {GOALS['compile_seconds_max']:.0f} s",
                              "measured": seconds, "met": seconds < GOALS["compile_seconds_max"]}
  p = result.get("pipeline", {})
  if "over_fastest_train_step" in p:
    out["pipeline_over_train"] = {"goal": f">= {GOALS['pipeline_over_train_min']}x",
                                  "measured": p["over_fastest_train_step"],
                                  "met": p["over_fastest_train_step"] >= GOALS["pipeline_over_train_min"]}
  return out


def machine_info() -> dict[str, Any]:
  cpu = platform.processor() or platform.machine()
  try:
    for line in open("/proc/cpuinfo", encoding="utf-8"):
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  try:
    load = os.getloadavg()
  except OSError:
    load = None
  return {"cpu": cpu, "cpu_count": os.cpu_count(), "load_average": load,
          "python": platform.python_version(), "jax": jax.__version__,
          "backend": jax.default_backend(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "malloc_tuned": malloc_tuning.active()}


def to_markdown(result) -> str:
  s = result["settings"]
  rows = result["train"]
  has_eval = any("eval_images_per_second" in r for r in rows.values())
  lines = [f"{s['model']}, batch {s['batch_size']}, {s['rounds']} rounds x {s['steps_per_round']} "
           f"steps, 1 device, float32; medians over rounds, ratios = median per-round ratio",
           "",
           "| recalibration | params | +params | compile s | peak MB | train img/s | train x none "
           "| train CPU x none |" + (" eval img/s | eval x none |" if has_eval else ""),
           "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if has_eval else "")]
  for r, v in rows.items():
    peak = "-" if v["peak_mb"] is None else f"{v['peak_mb']:.0f}"
    line = (f"| {r} | {v['params']:,} | {100 * v['params_overhead']:+.2f}% | "
            f"{v['compile_seconds']:.1f} | {peak} | {v['train_images_per_second']:.1f} | "
            f"{v['train_ratio_vs_none']:.3f} | {v['train_cpu_ratio_vs_none']:.3f} |")
    if has_eval:
      line += f" {v['eval_images_per_second']:.1f} | {v['eval_ratio_vs_none']:.3f} |"
    lines.append(line)
  t = result.get("torch")
  if t:
    lines += ["", f"PyTorch {t['reference'].get('torch')} eager ({t['reference'].get('threads')} "
              f"threads) vs JAX ({s.get('conv_impl', 'xla')} convolutions), {t['model']} train "
              f"step, batch {s['batch_size']}, alternating:",
              "", "| | JAX img/s | PyTorch img/s | JAX speed / PyTorch |", "|---|---:|---:|---:|",
              f"| train | {t['jax_images_per_second']:.1f} | {t['torch_images_per_second']:.1f} | "
              f"{t['jax_speed_over_torch']:.2f}x |"]
    if "jax_xla_conv_images_per_second" in t:
      lines.append(f"| train, XLA's convolutions | {t['jax_xla_conv_images_per_second']:.1f} | "
                   f"{t['torch_images_per_second']:.1f} | {t['jax_xla_conv_speed_over_torch']:.2f}x |")
    if "jax_eval_images_per_second" in t:
      lines.append(f"| eval | {t['jax_eval_images_per_second']:.1f} | "
                   f"{t['torch_eval_images_per_second']:.1f} | {t['jax_eval_speed_over_torch']:.2f}x |")
  p = result.get("pipeline")
  if p:
    if "skipped" in p:
      lines += ["", f"input pipeline: skipped ({p['skipped']})"]
    else:
      lines += ["", f"input pipeline ({p['dataset']} train, {p['augmentation']}, batch "
                f"{p['batch_size']}): {p['images_per_second']:.0f} img/s = "
                f"{p['over_fastest_train_step']:.1f}x the fastest train step (first batch after "
                f"{p['first_batch_seconds']:.1f} s: decode, cache, shuffle buffer "
                f"{p['shuffle_buffer']})"]
  c = result.get("compile")
  if c:
    cc = result.get("compile_cpu", {})
    lines += [""] + [f"compile {k} (train step, batch {result['settings'].get('compile_batch_size')}): "
                     f"{v:.1f} s wall, {cc.get(k, float('nan')):.1f} s CPU" for k, v in c.items()]
  lines += ["", f"process max RSS: {result['max_rss_mb']:.0f} MB; machine: "
            f"{result['machine']['cpu']}, {result['machine']['cpu_count']} CPUs, load "
            f"{_fmt_load(result['machine']['load_average'])}, jax {result['machine']['jax']}, "
            f"glibc malloc tuned {'yes' if result['machine'].get('malloc_tuned') else 'no'}"]
  g = result.get("goals")
  if g:
    lines += ["", "| goal | target | measured | met |", "|---|---|---:|---|"]
    for k, v in g.items():
      m = v["measured"]
      shown = f"{100 * m:+.2f}%" if k.endswith("overhead") else f"{m:.3f}"
      lines.append(f"| {k} | {v['goal']} | {shown} | {'yes' if v['met'] else 'no'} |")
  return "\n".join(lines)


def _fmt_load(load):
  return "?" if not load else "/".join(f"{x:.1f}" for x in load)


def _parse_set(text: str):
  if "=" not in text:
    raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {text!r}")
  key, value = text.split("=", 1)
  try:
    value = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    pass
  return key, value


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="cifar_resnet56", choices=list_models())
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--recalibrations", default="none,se,ms_sar")
  parser.add_argument("--set", action="append", type=_parse_set, default=[], metavar="KEY=VALUE",
                      help="network field for all arms, e.g. --set depth=8 --set width=4")
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--steps", type=int, default=2, help="train (and eval) steps per round")
  parser.add_argument("--no-eval", dest="eval", action="store_false")
  parser.add_argument("--no-pipeline", dest="pipeline", action="store_false")
  parser.add_argument("--data-dir", default=os.environ.get("MSSAR_TFDS_DATA_DIR")
                      or os.environ.get("TFDS_DATA_DIR") or str(_ROOT.parent / "shared/data/tfds"))
  parser.add_argument("--pipeline-batches", type=int, default=100)
  parser.add_argument("--shuffle-buffer", type=int, default=50_000,
                      help="the CIFAR recipe's full shuffle (default 50,000)")
  parser.add_argument("--compile", action="store_true",
                      help="also time the compilation of --compile-models (slow)")
  parser.add_argument("--compile-models", default=",".join(DEFAULT_COMPILE),
                      type=lambda s: [x for x in s.split(",") if x])
  parser.add_argument("--compile-batch-size", type=int, default=128)
  parser.add_argument("--torch-python", default="", help="python of a venv with torch")
  parser.add_argument("--torch-model", default="cifar_resnet20")
  parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--xla-flags", default=xla_flags.FAST_CPU_FLAGS,
                      help="XLA flags added to $XLA_FLAGS before JAX starts ('' : none); "
                           f"default: {xla_flags.FAST_CPU_FLAGS}")
  parser.add_argument("--conv-impl", default="auto", choices=("auto", "xla", "onednn"),
                      help="convolutions of the JAX arms (native.onednn_conv; auto: oneDNN on "
                           "one CPU device when installed)")
  parser.add_argument("--json", default="bench.json", help="where to write the JSON ('' : not)")
  parser.add_argument("--quick", action="store_true",
                      help="CI smoke run: cifar_resnet20, batch 32, 3 rounds x 1 step, "
                           "20 pipeline batches with a 2,048 shuffle buffer")
  args = parser.parse_args(argv)
  if args.quick:
    given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
    if "--model" not in given:
      args.model = "cifar_resnet20"
    if "--batch-size" not in given:
      args.batch_size = 32
    if "--rounds" not in given:
      args.rounds = 3  # a median that one slow step cannot move
    if "--steps" not in given:
      args.steps = 1
    if "--pipeline-batches" not in given:
      args.pipeline_batches = 20
    if "--shuffle-buffer" not in given:
      args.shuffle_buffer = 2048
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.xla_flags:
    xla_flags.add_xla_flags(args.xla_flags)
  try:
    result = run(args)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(to_markdown(result))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)
    print(f"\nJSON: {args.json}")
  return 0


if __name__ == "__main__":
  malloc_tuning.reexec_with_tuned_malloc()  # measure the step as train.py runs it
  sys.exit(main())
