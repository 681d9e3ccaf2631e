"""Speed benchmark: train/eval throughput of none / se / ms_sar, compile time, parameters,
memory, the CIFAR-10 and ImageNet input pipelines, JAX's persistent compilation cache, and
(optionally) a PyTorch reference, in one run.

    python benchmarks/bench.py                                  # cifar_resnet56, batch 128
    python benchmarks/bench.py --torch_python /work/torch_venv/bin/python --compile
    python benchmarks/bench.py --quick --data_dir "$MSSAR_TFDS_DATA_DIR" --json out.json  # CI
    python benchmarks/bench.py --implementation xla            # plain flax layers, XLA's convs
    python benchmarks/bench.py --quick --config.depth=8 --config.width=4 --batch_size 8
    python benchmarks/bench.py --helpfull                       # every flag

Everything that is compared is measured side by side: after one untimed round, every round
times ``--steps`` train steps of each arm in turn (none, se, ms_sar, the PyTorch subprocess,
...), so load from other processes hits all arms alike; the table reports medians over
rounds, and ratios are the medians of the per-round ratios. Wall time is what counts; process
CPU time per step is reported too (less sensitive to other jobs on a shared machine).

The train step is the trainer's own ``mssar_jax.train.step.train_step``: uint8 images
normalised on the device, forward in train mode with BatchNorm updates, softmax
cross-entropy, gradients, SGD momentum 0.9 with coupled weight decay 1e-4 (``train.optim``),
state donated; one device. Eval is the trainer's ``eval_step`` (inference forward, masked
top-1 / top-5 / loss sums). The layers are computed as ``--implementation`` says
(``mssar_jax.backends.choose`` for one device: ``auto`` = ``cpu`` on a CPU, i.e. oneDNN FFI
convolutions, two-pass BatchNorm, folded recalibration, gate kernels, block barriers).
``compile s`` is XLA's compile time of the train step (JAX's persistent compilation cache is
off for it, so it is a compilation, never a cache load); ``peak MB`` is XLA's buffer
assignment for the compiled step (arguments + outputs + temporaries - aliased); the process
maximum RSS is reported once.

The PyTorch reference (``benchmarks/torch_resnet.py``, run with the interpreter given by
``--torch_python``; torch is never imported here) is the same CIFAR ResNet train step, eager,
on float images, with ``--torch_threads`` threads (default: the CPU count, which is what
XLA:CPU uses). When the JAX arms use oneDNN convolutions, a JAX arm with XLA's own
convolutions (the same CPU implementation otherwise) is timed against PyTorch too.

Input pipelines (``mssar_jax.data.TrainData``, read alone, after their first batch): the
CIFAR-10 train stream (pad 4, random crop 32, random flip; cached decoded images) and the
ImageNet train stream (``configs/imagenet.py:resnet50,none``: TFDS JPEG decode fused with a
random-resized crop, resize to 224, random flip; no cache) on the imagenet2012 data in
``--data_dir`` (a 1,000-image sample suffices). Both are reported in img/s, per CPU core this
process may use (``os.sched_getaffinity``) and per second of process CPU time.

Persistent compilation cache: ``--compile_cache_model``'s train step is traced and compiled
in a fresh process with an empty ``jax_compilation_cache_dir``
(``jax_persistent_cache_min_compile_time_secs=0``), then again in a second fresh process
reusing that directory; both times and the ratio are reported (``--quick``: the quick
network with ms_sar at the quick batch).

Network and recalibration arguments: ``--config.<argument>=<value>`` (``--config.depth=8``,
``--config.scales='(2,4)'``; ``--helpfull`` lists them) sets it for every arm: a network field
for all of them, a recalibration argument for the arms whose recalibration takes it. Unset
ones keep the model's defaults.

Output: a markdown table on stdout, JSON in ``--json``. Run as a program it first re-runs
itself with the trainer's glibc malloc tunables (``mssar_jax.cpu_process``; the PyTorch and
cache-probe subprocesses inherit them), so it times the step as ``train.py`` runs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import pathlib
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from typing import Any, Sequence

if __name__ == "__main__":
  # Measure the step as train.py runs it: re-run this command line once with the trainer's
  # glibc malloc tunables, before JAX and the rest are imported (cpu_process imports nothing).
  from mssar_jax import cpu_process as _cpu_process
  _cpu_process.reexec_with_tuned_malloc()

from absl import app
from absl import flags
import jax
from jax.experimental.compilation_cache import compilation_cache as jax_compilation_cache
import jax.numpy as jnp
import numpy as np
from ml_collections import config_dict
from ml_collections import config_flags
import optax

from mssar_jax import datasets
from mssar_jax import backends
from mssar_jax import config_lib
from mssar_jax import cpu_process
from mssar_jax.backends import cpu
from mssar_jax.backends.cpu import gate_kernels
from mssar_jax.backends.cpu import onednn_conv
from mssar_jax.errors import ConfigError
from mssar_jax.models import Implementation, get_model, input_size, list_models
from mssar_jax.models import get_spec, model_arguments
from mssar_jax.recalibration import get_recalibration, list_recalibrations
from mssar_jax.recalibration import recalibration_arguments
from mssar_jax.train import optim
from mssar_jax.train import state as state_lib
from mssar_jax.train import step as step_lib

_ROOT = pathlib.Path(__file__).resolve().parents[1]
TORCH_SCRIPT = _ROOT / "benchmarks" / "torch_resnet.py"
DEFAULT_COMPILE = ("cifar_resnet110:ms_sar", "cifar_densenet_bc100:ms_sar")
DEFAULT_COMPILE_CACHE = "cifar_resnet110:ms_sar"
GOALS = {"ms_sar_train_ratio_max": 1.10, "ms_sar_params_overhead_max": 0.05,
         "jax_over_torch_min": 1.0, "compile_seconds_max": 30.0, "pipeline_over_train_min": 5.0}
_PROBE_PREFIX = "compile-cache-probe "
_CACHE_HITS = "/jax/compilation_cache/cache_hits"


# ---------------------------------------------------------------------------------------------
# Implementation of the layers.

def resolve_implementation(name: str) -> dict[str, Any]:
  """``backends.choose(name)`` for the bench's single device, with what it uses spelled out:
  {'choice', 'onednn', 'kernels'} (oneDNN convolutions / gate kernels in use)."""
  choice = backends.choose(name, device_count=1)
  onednn = kernels = False
  if choice.impl != Implementation():  # the CPU backend: native parts as choose found them
    onednn, kernels, _ = cpu.native_status(1)
  return {"choice": choice, "onednn": onednn, "kernels": kernels}


# ---------------------------------------------------------------------------------------------
# Network and recalibration arguments (--config.<argument>=<value>).

_FIELD_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def _field_type(annotation) -> type | None:
  """The flag type of a dataclass field's annotation ('int', 'Sequence[int]', ...), or None."""
  text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__",
                                                                 str(annotation))
  if text in _FIELD_TYPES:
    return _FIELD_TYPES[text]
  if text.startswith(("Sequence", "tuple", "Tuple")):
    return tuple
  return None


def model_config() -> config_dict.ConfigDict:
  """``--config``'s fields: every network field and recalibration argument of the zoo, each
  unset (None: the model's default) until given on the command line."""
  classes = [(get_spec(m).constructor.func, model_arguments(m)) for m in list_models()]
  classes += [(get_recalibration(r), recalibration_arguments(r)) for r in list_recalibrations()
              if get_recalibration(r) is not None]
  fields: dict[str, type] = {}
  for cls, names in classes:
    annotations = {f.name: f.type for f in dataclasses.fields(cls)}
    for name in names:
      kind = _field_type(annotations[name])
      if kind is not None:
        fields.setdefault(name, kind)
  return config_dict.ConfigDict({k: config_dict.placeholder(v) for k, v in sorted(fields.items())})


def arm_kwargs(name: str, recalibration: str, model_kwargs: dict[str, Any]) -> dict[str, Any]:
  """The arguments of ``model_kwargs`` for one arm: network fields always, recalibration
  arguments only where ``recalibration`` takes them (anything else too, so that
  ``get_model`` names the mistake)."""
  recal = set(recalibration_arguments(recalibration))
  network = set(model_arguments(name))
  every = {a for r in list_recalibrations() for a in recalibration_arguments(r)}
  return {k: v for k, v in model_kwargs.items()
          if k in network or k in recal or k not in every}


# ---------------------------------------------------------------------------------------------
# JAX arms.

def _dataset_stats(size: int):
  """What the train step needs of the dataset (classes, mean, std) for this input size."""
  return datasets.get("imagenet2012" if size == 224 else "cifar10")


def _trainer_step(model, stats):
  """The trainer's own jitted train step (``step.train_step``: uint8 images normalised on the
  device, BatchNorm updates, cross-entropy, SGD momentum 0.9 with weight decay 1e-4, donated
  state), its optimiser and the jitted eval step."""
  config = config_lib.base_config()
  config.weight_decay, config.momentum, config.nesterov = 1e-4, 0.9, False
  config.weight_decay_on_bn_and_bias = True
  schedule = optax.constant_schedule(0.1)
  tx = optim.make_optimizer(config, schedule)
  step = functools.partial(step_lib.train_step, model=model, tx=tx, schedule=schedule,
                           stats=stats, label_smoothing=0.0)
  evaluate = functools.partial(step_lib.eval_step, model=model, stats=stats)
  return jax.jit(step, donate_argnums=(0,)), tx, jax.jit(evaluate)


class Arm:
  """One compiled (model, recalibration) train step and eval step, timed on demand."""

  def __init__(self, name: str, recalibration: str, batch_size: int, impl: Implementation,
               seed: int = 0, **model_kwargs):
    self.name, self.recalibration, self.batch_size = name, recalibration, batch_size
    size = input_size(name)
    stats = _dataset_stats(size)
    model = get_model(name, num_classes=stats.num_classes, recalibration=recalibration,
                      impl=impl, **arm_kwargs(name, recalibration, model_kwargs))
    train_step, tx, eval_step = _trainer_step(model, stats)
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, stats.num_classes, batch_size).astype(np.int32))
    self._batch = {"image": images, "label": labels}
    self._eval_batch = {**self._batch, "mask": jnp.ones((batch_size,), bool)}
    state = state_lib.init_state(jax.random.key(seed), model, tx, size)
    self.params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state.params))
    lowered = train_step.lower(state, self._batch)
    with no_persistent_cache():
      start = time.perf_counter()
      self._train = lowered.compile()
      self.compile_seconds = time.perf_counter() - start
    self.peak_bytes = _peak_bytes(self._train)
    self._eval = eval_step.lower(state, self._eval_batch).compile()
    self._state = state
    self.train_steps(1)  # first run: allocations, thread pools
    self.eval_steps(1)

  def train_steps(self, n: int) -> tuple[float, float]:
    """Runs n train steps; returns (wall, cpu) seconds per step."""
    wall, cpu_time = time.perf_counter(), time.process_time()
    for _ in range(n):
      self._state, metrics = self._train(self._state, self._batch)
    metrics["train/loss"].block_until_ready()
    return (time.perf_counter() - wall) / n, (time.process_time() - cpu_time) / n

  def eval_steps(self, n: int) -> tuple[float, float]:
    wall, cpu_time = time.perf_counter(), time.process_time()
    for _ in range(n):
      out = self._eval(self._state, self._eval_batch)
    out["loss"].block_until_ready()
    return (time.perf_counter() - wall) / n, (time.process_time() - cpu_time) / n


@contextlib.contextmanager
def no_persistent_cache():
  """JAX's persistent compilation cache off meanwhile (read at each compilation), so a timed
  compile is a compilation, never a cache load, whatever $JAX_COMPILATION_CACHE_DIR says."""
  enabled = jax.config.jax_enable_compilation_cache
  jax_compilation_cache.reset_cache()  # JAX decides once whether the cache is used: ask again
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)
    jax_compilation_cache.reset_cache()


def _peak_bytes(compiled) -> int | None:
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except  (not every backend reports it)
    return None


def _abstract_step(name: str, recalibration: str, batch_size: int, impl: Implementation,
                   **model_kwargs):
  """(jitted train step, abstract state, abstract batch) of a model, nothing computed."""
  size = input_size(name)
  stats = _dataset_stats(size)
  model = get_model(name, num_classes=stats.num_classes, recalibration=recalibration,
                    impl=impl, **arm_kwargs(name, recalibration, model_kwargs))
  train_step, tx, _ = _trainer_step(model, stats)
  state = jax.eval_shape(functools.partial(state_lib.init_state, model=model, tx=tx,
                                           image_size=size), jax.random.key(0))
  batch = {"image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8),
           "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
  return train_step, state, batch


def trace_and_compile(step, state, batch) -> dict[str, float]:
  """Trace (lower) + XLA compile of a train step from abstract shapes:
  {'trace_seconds', 'compile_seconds', 'seconds' (both), 'cpu_seconds'}. XLA compiles
  mostly on one thread, so on a loaded machine the wall time grows while the CPU time does
  not."""
  start, cpu_start = time.perf_counter(), time.process_time()
  lowered = step.lower(state, batch)
  traced = time.perf_counter()
  lowered.compile()
  end = time.perf_counter()
  return {"trace_seconds": traced - start, "compile_seconds": end - traced,
          "seconds": end - start, "cpu_seconds": time.process_time() - cpu_start}


def compile_seconds(name: str, recalibration: str, batch_size: int,
                    impl: Implementation) -> tuple[float, float]:
  """Trace + compile time of one train step (the model's default, unrolled blocks):
  (wall seconds, process CPU seconds)."""
  with no_persistent_cache():
    t = trace_and_compile(*_abstract_step(name, recalibration, batch_size, impl))
  return t["seconds"], t["cpu_seconds"]


# ---------------------------------------------------------------------------------------------
# JAX's persistent compilation cache (two fresh processes sharing one cache directory).

def compile_cache_probe(directory: str, spec: str, batch_size: int, implementation: str,
                        model_kwargs: dict[str, Any]) -> dict[str, Any]:
  """In this (fresh) process: trace + compile ``spec``'s train step with JAX's persistent
  compilation cache in ``directory`` (every compilation written); what it took and found."""
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  hits = []
  jax.monitoring.register_event_listener(
      lambda event, **_: hits.append(event) if event == _CACHE_HITS else None)
  name, _, recal = spec.partition(":")
  impl = resolve_implementation(implementation)["choice"].impl
  step, state, batch = _abstract_step(name, recal or "none", batch_size, impl, **model_kwargs)
  hits_before, before = len(hits), _cache_files(directory)  # the train step's own, below
  result = trace_and_compile(step, state, batch)
  result.update(cache_hits=len(hits) - hits_before,
                entries_written=len(_cache_files(directory) - before))
  return result


def _flag_text(value) -> str:
  """A --config value as the command line spells it (strings bare, the rest as literals)."""
  return value if isinstance(value, str) else repr(value)


def _cache_files(directory: str) -> set[str]:
  return {str(p) for p in pathlib.Path(directory).rglob("*") if p.is_file()}


def compile_cache_rate(args, spec: str, batch_size: int,
                       model_kwargs: dict[str, Any]) -> dict[str, Any]:
  """Runs ``compile_cache_probe`` in two subprocesses of this script, the first with an empty
  cache directory, the second reusing it; their times and the ratio first / second."""
  directory = tempfile.mkdtemp(prefix="mssar_bench_compile_cache_")
  cmd = [sys.executable, str(pathlib.Path(__file__).resolve()),
         f"--compile_cache_probe={directory}", f"--compile_cache_model={spec}",
         f"--compile_batch_size={batch_size}", f"--implementation={args.implementation}",
         f"--xla_flags={args.xla_flags}", "--json="]
  cmd += [f"--config.{key}={_flag_text(value)}" for key, value in model_kwargs.items()]
  env = cpu_process.environment() if cpu_process.wanted() else dict(os.environ)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the probe sets its own directory
  runs = {}
  try:
    for which in ("first", "second"):
      proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800,
                            check=False)
      lines = [l for l in proc.stdout.splitlines() if l.startswith(_PROBE_PREFIX)]
      if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"the {which} compile-cache process failed (exit {proc.returncode}:"
                          f" {err})")
      runs[which] = json.loads(lines[-1][len(_PROBE_PREFIX):])
    files = _cache_files(directory)
    size = sum(os.path.getsize(f) for f in files)
  finally:
    shutil.rmtree(directory, ignore_errors=True)
  first, second = runs["first"], runs["second"]
  return {"model": spec, "batch_size": batch_size, "implementation": args.implementation,
          "model_kwargs": {k: repr(v) for k, v in model_kwargs.items()},
          "min_compile_time_secs": 0.0, "first": first, "second": second,
          "cache_entries": len(files), "cache_mb": size / 2**20,
          "speedup": first["seconds"] / second["seconds"],
          "compile_speedup": first["compile_seconds"] / second["compile_seconds"]}


# ---------------------------------------------------------------------------------------------
# PyTorch reference (subprocess).

class TorchArm:
  """``benchmarks/torch_resnet.py`` in a subprocess, driven line by line."""

  def __init__(self, python: str, depth: int, batch_size: int, threads: int):
    if not TORCH_SCRIPT.exists():
      raise ConfigError(f"--torch_python: {TORCH_SCRIPT} is missing (run from a checkout).")
    cmd = [python, str(TORCH_SCRIPT), "--depth", str(depth), "--batch-size", str(batch_size),
           "--threads", str(threads)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    try:
      self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env)
    except OSError as e:
      raise ConfigError(f"--torch_python {python!r} cannot be started ({e}); pass the python "
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
# Input pipelines.

def cpu_cores() -> int:
  """CPU cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def _stream_rate(config, batch_size: int, batches: int) -> dict[str, Any]:
  """img/s of the trainer's train stream for ``config`` (``data.TrainData``), timed after its
  first batch: overall, per usable CPU core and per second of process CPU time."""
  from mssar_jax import data  # pylint: disable=import-outside-toplevel  (TensorFlow)
  data.hide_accelerators_from_tensorflow()
  builder = data.get_builder(config)
  info = data.get_info(config, builder, local_batch=batch_size, local_eval_batch=batch_size,
                       process_index=0, process_count=1)
  train = data.TrainData(config, builder, info, local_batch=batch_size, process_index=0,
                         process_count=1)
  start = time.perf_counter()
  stream = train.iterate(0)
  first = next(stream)
  warmup = time.perf_counter() - start
  size = info.image_size
  assert first["image"].shape == (batch_size, size, size, 3), first["image"].shape
  assert first["image"].dtype == np.uint8, first["image"].dtype
  start, cpu_start = time.perf_counter(), time.process_time()
  for _ in range(batches):
    next(stream)
  seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
  rate, cores = batches * batch_size / seconds, cpu_cores()
  return {"dataset": config.dataset, "image_size": size, "batch_size": batch_size,
          "batches": batches, "shuffle_buffer": config.shuffle_buffer, "cache": config.cache,
          "train_examples": info.train_examples, "steps_per_epoch": info.steps_per_epoch,
          "first_batch_seconds": warmup, "seconds": seconds, "cpu_seconds": cpu_seconds,
          "images_per_second": rate, "cpu_cores": cores,
          "images_per_second_per_core": rate / cores,
          "images_per_cpu_second": batches * batch_size / cpu_seconds if cpu_seconds else None}


def pipeline_rate(data_dir: str | None, batch_size: int, batches: int, shuffle_buffer: int,
                  dataset: str = "cifar10") -> dict[str, Any]:
  """The trainer's augmented CIFAR train stream (cached decoded images)."""
  from mssar_jax.configs import cifar  # pylint: disable=import-outside-toplevel
  config = cifar.get_config(f"{dataset},cifar_resnet20,none")
  config.data_dir, config.download = data_dir or "", False
  config.batch_size, config.shuffle_buffer, config.cache = batch_size, shuffle_buffer, True
  result = _stream_rate(config, batch_size, batches)
  result["augmentation"] = "pad 4, random crop 32, random flip"
  return result


def imagenet_pipeline_rate(data_dir: str | None, batch_size: int,
                           batches: int) -> dict[str, Any]:
  """The trainer's ImageNet train stream (``imagenet.get_config('resnet50,none')``: JPEG
  decode fused with the random-resized crop, resize 224, flip; no cache) on ``data_dir``."""
  from mssar_jax.configs import imagenet  # pylint: disable=import-outside-toplevel
  config = imagenet.get_config("resnet50,none")
  config.data_dir = data_dir or ""
  config.batch_size, config.cache = batch_size, False
  result = _stream_rate(config, batch_size, batches)
  result["augmentation"] = ("JPEG decode + random-resized crop (8-100% area, 3/4-4/3), "
                            f"resize {result['image_size']}, random flip")
  return result


# ---------------------------------------------------------------------------------------------
# Running and reporting.

def _median_ratio(a, b):
  return statistics.median(x / y for x, y in zip(a, b))


def _recalibrations(text: str) -> list[str]:
  """The comma list of recalibrations, 'none' first if it is missing (the base of ratios)."""
  recals = [r for r in text.split(",") if r]
  if "none" not in recals:
    recals.insert(0, "none")
  return recals


def _torch_depth(args) -> int | None:
  """The depth of --torch_model (a cifar_resnetN) when there is a PyTorch reference."""
  if not args.torch_python:
    return None
  m = re.fullmatch(r"cifar_resnet(\d+)", args.torch_model)
  if not m:
    raise ConfigError(f"--torch_model must be a cifar_resnetN (got {args.torch_model!r}).")
  return int(m.group(1))


def _build_arms(args, recals: list[str], resolved: dict[str, Any], model_kwargs,
                torch_depth: int | None) -> tuple[dict[str, Any], TorchArm | None]:
  """The JAX arms (one per recalibration) and, with --torch_python, the PyTorch reference
  and the JAX arms it is compared with: ({key: arm}, the PyTorch arm or None)."""
  choice = resolved["choice"]
  arms: dict[str, Any] = {}
  for r in recals:
    arms[r] = Arm(args.model, r, args.batch_size, choice.impl, **model_kwargs)
    print(f"bench: compiled {args.model} + {r} in {arms[r].compile_seconds:.1f} s",
          file=sys.stderr, flush=True)
  if not args.torch_python:
    return arms, None
  torch_model = args.torch_model
  if torch_model != args.model or model_kwargs:
    arms["jax_" + torch_model] = Arm(torch_model, "none", args.batch_size, choice.impl)
  if resolved["onednn"]:  # also time XLA's own convolutions against PyTorch
    xla_conv = cpu.implementation(onednn=False, kernels=resolved["kernels"])
    arms["jax_" + torch_model + "_xla_conv"] = Arm(torch_model, "none", args.batch_size,
                                                   xla_conv)
  torch_arm = TorchArm(args.torch_python, torch_depth, args.batch_size, args.torch_threads)
  arms["torch_" + torch_model] = torch_arm
  print(f"bench: PyTorch reference ready ({torch_arm.info})", file=sys.stderr, flush=True)
  return arms, torch_arm


def _time_rounds(args, arms: dict[str, Any]) -> types.SimpleNamespace:
  """One untimed round, then --rounds timed rounds of every arm in turn: per arm and round,
  train wall and CPU seconds per step and (with --eval) eval wall seconds per step."""
  wall = {k: [] for k in arms}
  cpu_time = {k: [] for k in arms}
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
      cpu_time[k].append(c)
      if args.eval:
        eval_wall[k].append(arms[k].eval_steps(args.steps)[0])
  return types.SimpleNamespace(wall=wall, cpu=cpu_time, eval_wall=eval_wall)


def _train_rows(args, recals: list[str], arms: dict[str, Any], t) -> dict[str, Any]:
  """Per recalibration: parameters, compile time, peak memory, medians and ratios to none."""
  bs, wall, cpu_time, eval_wall = args.batch_size, t.wall, t.cpu, t.eval_wall
  rows = {}
  base = arms["none"]
  for r in recals:
    a = arms[r]
    row = {"params": a.params, "params_overhead": a.params / base.params - 1,
           "compile_seconds": a.compile_seconds, "peak_mb": _mb(a.peak_bytes),
           "train_ms": 1e3 * statistics.median(wall[r]),
           "train_images_per_second": bs / statistics.median(wall[r]),
           "train_ratio_vs_none": _median_ratio(wall[r], wall["none"]),
           "train_cpu_ms": 1e3 * statistics.median(cpu_time[r]),
           "train_cpu_ratio_vs_none": _median_ratio(cpu_time[r], cpu_time["none"]),
           "train_wall_seconds_per_round": wall[r]}
    if args.eval:
      row.update({"eval_images_per_second": bs / statistics.median(eval_wall[r]),
                  "eval_ratio_vs_none": _median_ratio(eval_wall[r], eval_wall["none"])})
    rows[r] = row
  return rows


def _run_settings(args, model_kwargs, resolved: dict[str, Any]) -> dict[str, Any]:
  """The JSON's settings: what was run, and how the layers were computed."""
  choice = resolved["choice"]
  return {"model": args.model,
          "model_kwargs": {k: repr(v) for k, v in model_kwargs.items()},
          "batch_size": args.batch_size, "rounds": args.rounds, "steps_per_round": args.steps,
          "devices": 1, "dtype": "float32", "compile_batch_size": args.compile_batch_size,
          "implementation": args.implementation,
          "implementation_name": choice.impl.name,
          "implementation_reason": choice.reason,
          "conv_impl": "onednn" if resolved["onednn"] else "xla",
          "gate_kernels": resolved["kernels"],
          "onednn_unavailable": onednn_conv.LIBRARY.unavailable_reason,
          "gate_kernels_unavailable": gate_kernels.LIBRARY.unavailable_reason,
          "persistent_compilation_cache": "off for the timed compilations",
          "torch_threads": args.torch_threads if args.torch_python else None}


def _torch_comparison(args, arms: dict[str, Any], torch_arm: TorchArm, t) -> dict[str, Any]:
  """JAX against the PyTorch reference on the same network: img/s and median ratios."""
  bs, wall, eval_wall, torch_model = args.batch_size, t.wall, t.eval_wall, args.torch_model
  jk = "jax_" + torch_model if "jax_" + torch_model in arms else "none"
  tk = "torch_" + torch_model
  out = {
      "model": torch_model, "reference": torch_arm.info,
      "jax_images_per_second": bs / statistics.median(wall[jk]),
      "torch_images_per_second": bs / statistics.median(wall[tk]),
      "jax_speed_over_torch": _median_ratio(wall[tk], wall[jk]),
      "jax_best_round_ms": 1e3 * min(wall[jk]), "torch_best_round_ms": 1e3 * min(wall[tk]),
      "jax_wall_seconds_per_round": wall[jk], "torch_wall_seconds_per_round": wall[tk]}
  xk = "jax_" + torch_model + "_xla_conv"
  if xk in arms:
    out.update({
        "jax_xla_conv_images_per_second": bs / statistics.median(wall[xk]),
        "jax_xla_conv_speed_over_torch": _median_ratio(wall[tk], wall[xk]),
        "onednn_conv_speed_over_xla_conv": _median_ratio(wall[xk], wall[jk]),
        "jax_xla_conv_wall_seconds_per_round": wall[xk]})
  if args.eval:
    out.update({
        "jax_eval_images_per_second": bs / statistics.median(eval_wall[jk]),
        "torch_eval_images_per_second": bs / statistics.median(eval_wall[tk]),
        "jax_eval_speed_over_torch": _median_ratio(eval_wall[tk], eval_wall[jk])})
  return out


def _add_pipelines(args, result: dict[str, Any]) -> None:
  """result['pipeline'] (CIFAR-10, against the fastest train step) and, unless
  --imagenet_batches 0, result['imagenet_pipeline']; each {'skipped': why} without data."""
  fastest = max(r["train_images_per_second"] for r in result["train"].values())
  try:
    p = pipeline_rate(args.data_dir, args.batch_size, args.pipeline_batches,
                      args.shuffle_buffer)
    p["over_fastest_train_step"] = p["images_per_second"] / fastest
    result["pipeline"] = p
  except ConfigError as e:
    result["pipeline"] = {"skipped": str(e)}
  if args.imagenet_batches > 0:
    try:
      result["imagenet_pipeline"] = imagenet_pipeline_rate(
          args.data_dir, args.imagenet_batch_size, args.imagenet_batches)
    except ConfigError as e:
      result["imagenet_pipeline"] = {"skipped": str(e)}
  for key in ("pipeline", "imagenet_pipeline"):
    p = result.get(key, {})
    if "images_per_second" in p:
      print(f"bench: {p['dataset']} train stream: {p['images_per_second']:.0f} img/s "
            f"({p['images_per_second_per_core']:.0f} per core)", file=sys.stderr, flush=True)


def _add_compile_times(args, result: dict[str, Any], impl: Implementation) -> None:
  """result['compile'] and ['compile_cpu']: trace + compile seconds of --compile_models."""
  result["compile"] = {}
  for spec in args.compile_models:
    name, _, recal = spec.partition(":")
    seconds, cpu_seconds = compile_seconds(name, recal or "none", args.compile_batch_size,
                                           impl)
    result["compile"][spec] = seconds
    result.setdefault("compile_cpu", {})[spec] = cpu_seconds
    print(f"bench: compile {spec} (batch {args.compile_batch_size}): {seconds:.1f} s "
          f"({cpu_seconds:.1f} s CPU)", file=sys.stderr, flush=True)


def _add_compile_cache(args, result: dict[str, Any], model_kwargs) -> None:
  """result['compile_cache']: --compile_cache_model with an empty, then a reused cache."""
  spec = args.compile_cache_model
  # --config belongs to --model: it shapes the probe only when the probe builds that model.
  kwargs = model_kwargs if spec.partition(":")[0] == args.model else {}
  try:
    c = compile_cache_rate(args, spec, args.compile_batch_size, kwargs)
    result["compile_cache"] = c
    print(f"bench: persistent compilation cache, {spec}: {c['first']['seconds']:.1f} s "
          f"empty, {c['second']['seconds']:.1f} s reused ({c['speedup']:.1f}x)",
          file=sys.stderr, flush=True)
  except (ConfigError, subprocess.TimeoutExpired) as e:
    result["compile_cache"] = {"model": spec, "skipped": str(e)}


def run(args) -> dict[str, Any]:
  """Builds the arms, alternates timing rounds, returns the JSON-able results."""
  model_kwargs = dict(args.model_kwargs)
  recals = _recalibrations(args.recalibrations)
  torch_depth = _torch_depth(args)
  resolved = resolve_implementation(args.implementation)
  choice = resolved["choice"]
  print(f"bench: implementation: {choice.impl.name} ({choice.reason})", file=sys.stderr,
        flush=True)
  arms, torch_arm = _build_arms(args, recals, resolved, model_kwargs, torch_depth)
  times = _time_rounds(args, arms)
  if torch_arm is not None:
    torch_arm.close()

  rows = _train_rows(args, recals, arms, times)
  result: dict[str, Any] = {"machine": machine_info(),
                            "settings": _run_settings(args, model_kwargs, resolved),
                            "train": rows}
  if torch_arm is not None:
    result["torch"] = _torch_comparison(args, arms, torch_arm, times)
  if args.pipeline:
    _add_pipelines(args, result)
  if args.compile:
    _add_compile_times(args, result, choice.impl)
  if args.compile_cache:
    _add_compile_cache(args, result, model_kwargs)
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
  cpu_name = platform.processor() or platform.machine()
  try:
    for line in open("/proc/cpuinfo", encoding="utf-8"):
      if line.startswith("model name"):
        cpu_name = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  try:
    load = os.getloadavg()
  except OSError:
    load = None
  return {"cpu": cpu_name, "cpu_count": os.cpu_count(), "usable_cores": cpu_cores(),
          "load_average": load, "python": platform.python_version(), "jax": jax.__version__,
          "backend": jax.default_backend(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "malloc_tuned": cpu_process.active()}


def _pipeline_row(label: str, p: dict[str, Any]) -> str:
  per_cpu = p.get("images_per_cpu_second")
  over = p.get("over_fastest_train_step")
  return (f"| {label} | {p['batch_size']} | {p['images_per_second']:.0f} | {p['cpu_cores']} | "
          f"{p['images_per_second_per_core']:.0f} | "
          f"{'-' if per_cpu is None else f'{per_cpu:.0f}'} | "
          f"{'-' if over is None else f'{over:.1f}x'} | {p['first_batch_seconds']:.1f} |")


def _train_table(result) -> list[str]:
  """The heading line and the per-recalibration table."""
  s = result["settings"]
  rows = result["train"]
  has_eval = any("eval_images_per_second" in r for r in rows.values())
  lines = [f"{s['model']}, batch {s['batch_size']}, {s['rounds']} rounds x {s['steps_per_round']} "
           f"steps, 1 device, float32, implementation {s.get('implementation_name', '?')}; "
           "medians over rounds, ratios = median per-round ratio",
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
  return lines


def _torch_table(result) -> list[str]:
  """JAX against the PyTorch reference (nothing without one)."""
  s, t = result["settings"], result.get("torch")
  if not t:
    return []
  lines = ["", f"PyTorch {t['reference'].get('torch')} eager ({t['reference'].get('threads')} "
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
  return lines


def _pipeline_lines(result) -> list[str]:
  """The input pipelines' table (those measured), then a line per skipped one."""
  lines = []
  pipelines = [(k, result[k]) for k in ("pipeline", "imagenet_pipeline") if k in result]
  measured = [(k, p) for k, p in pipelines if "skipped" not in p]
  if measured:
    lines += ["", "| input pipeline (train stream alone, after its first batch) | batch | img/s "
              "| CPU cores | img/s per core | img per CPU s | x fastest train step "
              "| first batch s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for _, p in measured:
      cached = "cached" if p.get("cache") else "no cache"
      lines.append(_pipeline_row(f"{p['dataset']} {p['image_size']}px: {p['augmentation']}; "
                                 f"{cached}, shuffle buffer {p['shuffle_buffer']:,}", p))
  for k, p in pipelines:
    if "skipped" in p:
      lines += ["", f"input pipeline {'imagenet2012' if k.startswith('imagenet') else 'cifar10'}"
                f": skipped ({p['skipped']})"]
  return lines


def _compile_lines(result) -> list[str]:
  """--compile's trace + compile times (nothing without --compile)."""
  c = result.get("compile")
  if not c:
    return []
  cc = result.get("compile_cpu", {})
  return [""] + [f"compile {k} (train step, batch {result['settings'].get('compile_batch_size')}): "
                 f"{v:.1f} s wall, {cc.get(k, float('nan')):.1f} s CPU" for k, v in c.items()]


def _compile_cache_lines(result) -> list[str]:
  """The persistent compilation cache: the two processes' times, or why it was skipped."""
  cache = result.get("compile_cache")
  if not cache:
    return []
  if "skipped" in cache:
    return ["", f"persistent compilation cache ({cache['model']}): skipped "
            f"({cache['skipped']})"]
  extra = "".join(f", {k}={v}" for k, v in cache["model_kwargs"].items())
  lines = ["", f"JAX persistent compilation cache, {cache['model']}{extra} train step, batch "
           f"{cache['batch_size']}, each in a fresh process:", "",
           "| compilation cache | trace s | compile s | total s | CPU s | cache hits |",
           "|---|---:|---:|---:|---:|---:|"]
  for which, label in (("first", "empty (first process)"),
                       ("second", "reused (second process)")):
    v = cache[which]
    lines.append(f"| {label} | {v['trace_seconds']:.1f} | {v['compile_seconds']:.2f} | "
                 f"{v['seconds']:.1f} | {v['cpu_seconds']:.1f} | {v['cache_hits']} |")
  lines.append(f"| first / second | | {cache['compile_speedup']:.1f}x | "
               f"{cache['speedup']:.2f}x | | |")
  return lines


def _machine_lines(result) -> list[str]:
  return ["", f"process max RSS: {result['max_rss_mb']:.0f} MB; machine: "
          f"{result['machine']['cpu']}, {result['machine']['cpu_count']} CPUs, load "
          f"{_fmt_load(result['machine']['load_average'])}, jax {result['machine']['jax']}, "
          f"glibc malloc tuned {'yes' if result['machine'].get('malloc_tuned') else 'no'}"]


def _goal_table(result) -> list[str]:
  g = result.get("goals")
  if not g:
    return []
  lines = ["", "| goal | target | measured | met |", "|---|---|---:|---|"]
  for k, v in g.items():
    m = v["measured"]
    shown = f"{100 * m:+.2f}%" if k.endswith("overhead") else f"{m:.3f}"
    lines.append(f"| {k} | {v['goal']} | {shown} | {'yes' if v['met'] else 'no'} |")
  return lines


def to_markdown(result) -> str:
  """The results as markdown: train table, PyTorch comparison, input pipelines, compile
  times, compilation cache, machine, goals (each section only when measured)."""
  lines = _train_table(result)
  lines += _torch_table(result)
  lines += _pipeline_lines(result)
  lines += _compile_lines(result)
  lines += _compile_cache_lines(result)
  lines += _machine_lines(result)
  lines += _goal_table(result)
  return "\n".join(lines)


def _fmt_load(load):
  return "?" if not load else "/".join(f"{x:.1f}" for x in load)


# ---------------------------------------------------------------------------------------------
# Command line (absl flags; ``main`` parses into a flag set of its own, so tests can call it).

# --quick's settings, for the flags not given on the command line.
QUICK = {"model": "cifar_resnet20", "batch_size": 32,
         "rounds": 3,  # a median that one slow step cannot move
         "steps": 1, "pipeline_batches": 20, "shuffle_buffer": 2048, "imagenet_batches": 8}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS,
                 sys_argv: Sequence[str] | None = None) -> None:
  """The benchmark's flags, in ``flag_values``. ``sys_argv``: the command line that
  ``--config.<argument>`` overrides are read from (default: sys.argv)."""
  fv = {"flag_values": flag_values}
  _define_model_flags(fv, sys_argv)
  _define_timing_flags(fv)
  _define_pipeline_flags(fv)
  _define_compile_flags(fv)
  _define_torch_flags(fv)
  _define_output_flags(fv)


def _define_model_flags(fv: dict[str, Any], sys_argv: Sequence[str] | None) -> None:
  """The network, batch, recalibrations, --config arguments and implementation."""
  flags.DEFINE_enum("model", "cifar_resnet56", list_models(), "Network of the JAX arms.", **fv)
  flags.DEFINE_integer("batch_size", 128, "Train (and eval) batch.", **fv)
  flags.DEFINE_string("recalibrations", "none,se,ms_sar",
                      "Comma list of recalibrations timed side by side ('none' always is).",
                      **fv)
  config_flags.DEFINE_config_dict(
      "config", model_config(),
      "Network fields and recalibration arguments for all arms, e.g. --config.depth=8 "
      "--config.width=4 --config.scales='(2,4)' (unset: the model's defaults; a "
      "recalibration argument goes to the arms whose recalibration takes it).",
      sys_argv=None if sys_argv is None else list(sys_argv), **fv)
  flags.DEFINE_enum("implementation", "auto", list(backends.CHOICES),
                    "How the JAX arms compute their layers (mssar_jax.backends.choose, one "
                    "device): auto (cpu on a CPU), xla (plain flax layers, XLA's convolutions) "
                    "or cpu (oneDNN FFI convolutions and gate kernels where built, two-pass "
                    "BatchNorm, folded recalibration).", **fv)


def _define_timing_flags(fv: dict[str, Any]) -> None:
  """Rounds and steps of the timed train (and eval) steps."""
  flags.DEFINE_integer("rounds", 7, "Timed rounds (medians over them).", **fv)
  flags.DEFINE_integer("steps", 2, "Train (and eval) steps per arm per round.", **fv)
  flags.DEFINE_boolean("eval", True, "Also time the eval step (--noeval: not).", **fv)


def _define_pipeline_flags(fv: dict[str, Any]) -> None:
  """The CIFAR-10 and ImageNet input pipelines."""
  flags.DEFINE_boolean("pipeline", True, "Time both input pipelines (--nopipeline: skip them).",
                       **fv)
  flags.DEFINE_string("data_dir", os.environ.get("MSSAR_TFDS_DATA_DIR")
                      or os.environ.get("TFDS_DATA_DIR") or str(_ROOT.parent / "shared/data/tfds"),
                      "TFDS data_dir holding cifar10 and imagenet2012.", **fv)
  flags.DEFINE_integer("pipeline_batches", 100, "CIFAR-10 train batches timed (batch "
                       "--batch_size).", **fv)
  flags.DEFINE_integer("shuffle_buffer", 50_000, "CIFAR shuffle buffer (default 50,000: the "
                       "recipe's full shuffle).", **fv)
  flags.DEFINE_integer("imagenet_batches", 30, "ImageNet train batches timed (0: skip); 30 "
                       "stays within the first epoch of the 1,000-image sample at batch 32.",
                       **fv)
  flags.DEFINE_integer("imagenet_batch_size", 32, "Batch of the ImageNet train stream.", **fv)


def _define_compile_flags(fv: dict[str, Any]) -> None:
  """Compile times and JAX's persistent compilation cache."""
  flags.DEFINE_boolean("compile", False, "Also time the compilation of --compile_models "
                       "(slow).", **fv)
  flags.DEFINE_list("compile_models", list(DEFAULT_COMPILE),
                    "MODEL:RECALIBRATION train steps that --compile times.", **fv)
  flags.DEFINE_integer("compile_batch_size", 128, "Batch of --compile and of the "
                       "compilation-cache processes (--quick: --batch_size).", **fv)
  flags.DEFINE_boolean("compile_cache", True, "Measure JAX's persistent compilation cache "
                       "(--nocompile_cache: skip it).", **fv)
  flags.DEFINE_string("compile_cache_model", DEFAULT_COMPILE_CACHE,
                      "MODEL:RECALIBRATION whose train step is compiled with an empty, then a "
                      f"reused persistent cache (default {DEFAULT_COMPILE_CACHE}; --quick: "
                      "--model:ms_sar).", **fv)
  flags.DEFINE_string("compile_cache_probe", "", "Internal: the cache directory of one "
                      "compilation-cache subprocess.", **fv)


def _define_torch_flags(fv: dict[str, Any]) -> None:
  """The PyTorch reference."""
  flags.DEFINE_string("torch_python", "", "Python of a venv with torch: adds the PyTorch "
                      "reference ('': none).", **fv)
  flags.DEFINE_string("torch_model", "cifar_resnet20", "The PyTorch reference's network (a "
                      "cifar_resnetN).", **fv)
  flags.DEFINE_integer("torch_threads", os.cpu_count() or 1, "Threads of the PyTorch "
                       "reference.", **fv)


def _define_output_flags(fv: dict[str, Any]) -> None:
  """XLA flags, the JSON and --quick."""
  flags.DEFINE_string("xla_flags", cpu_process.FAST_CPU_FLAGS,
                      "XLA flags added to $XLA_FLAGS before JAX starts ('': none).", **fv)
  flags.DEFINE_string("json", "bench.json", "Where to write the JSON ('': not).", **fv)
  flags.DEFINE_boolean("quick", False, "CI smoke run: cifar_resnet20, batch 32, 3 rounds x 1 "
                       "step, 20 CIFAR pipeline batches with a 2,048 shuffle buffer, 8 ImageNet "
                       "batches, the compilation cache on --model + ms_sar at --batch_size "
                       "(flags given on the command line win).", **fv)


def settings(flag_values: flags.FlagValues) -> types.SimpleNamespace:
  """The parsed flags as one namespace (``args``), --quick's settings applied, and
  ``model_kwargs``: the --config arguments given."""
  own = flag_values.flags_by_module_dict()[flag_values.find_module_defining_flag("model")]
  names = [f.name for f in own if f.name != "config"]
  args = types.SimpleNamespace(**{n: flag_values[n].value for n in names})
  args.compile_models = [x for x in args.compile_models if x]
  args.model_kwargs = {k: v for k, v in flag_values["config"].value.to_dict().items()
                       if v is not None}
  if args.quick:
    given = {n for n in names if flag_values[n].present}
    for name, value in QUICK.items():
      if name not in given:
        setattr(args, name, value)
    if "compile_cache_model" not in given:
      args.compile_cache_model = f"{args.model}:ms_sar"
    if "compile_batch_size" not in given:
      args.compile_batch_size = args.batch_size
  return args


def bench(args) -> int:
  """Runs the benchmark (or, with --compile_cache_probe, one compilation-cache probe)."""
  if args.xla_flags:
    cpu_process.add_xla_flags(args.xla_flags)
  try:
    if args.compile_cache_probe:  # a subprocess of compile_cache_rate
      probe = compile_cache_probe(args.compile_cache_probe, args.compile_cache_model,
                                  args.compile_batch_size, args.implementation,
                                  args.model_kwargs)
      print(_PROBE_PREFIX + json.dumps(probe), flush=True)
      return 0
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


def main(argv: Sequence[str] | None = None) -> int:
  """The benchmark on the command line ``argv`` (the arguments after the program name;
  default: sys.argv's), parsed into a flag set of its own: callable from Python (tests)."""
  argv = [sys.argv[0] if sys.argv else "bench.py",
          *(sys.argv[1:] if argv is None else argv)]
  flag_values = flags.FlagValues()
  try:
    define_flags(flag_values, sys_argv=argv)  # reads the --config.<argument> overrides
    rest = flag_values(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except (AttributeError, KeyError) as e:
    print(f"error: unknown --config argument {str(e).strip(chr(34) + chr(39))!r}; "
          "--helpfull lists them", file=sys.stderr)
    return 2
  if len(rest) > 1:
    print(f"error: unexpected arguments {rest[1:]}", file=sys.stderr)
    return 2
  return bench(settings(flag_values))


def _app_main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  return bench(settings(flags.FLAGS))


if __name__ == "__main__":
  try:
    define_flags()  # reads the --config.<argument> overrides given
  except (AttributeError, KeyError) as error:
    sys.exit(f"error: unknown --config argument {str(error).strip(chr(34) + chr(39))!r}; "
             "--helpfull lists them")
  app.run(_app_main)

