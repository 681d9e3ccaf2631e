"""Accelerator benchmark: ResNet-50 with none / se / ms_sar in JAX (bf16, data-parallel) and,
where torch and timm import, timm's resnet50 / seresnet50 in PyTorch, in one run.

    python benchmarks/accelerator.py                     # one GPU: under 6 minutes
    python benchmarks/accelerator.py --notorch --json accelerator.json
    python benchmarks/accelerator.py --tiny --steps 2 --rounds 2 --batch_per_device 4   # CPU
    python benchmarks/accelerator.py --helpfull                # every flag

JAX arms. ``get_model(model, recalibration=..., dtype=bfloat16, impl=backends.choose(...))``,
data-parallel over all local devices: ``jax.jit`` over a 1-D ``Mesh`` ('data',), the batch
sharded ``P('data')``, the train state replicated and donated. Global batch =
``--batch_per_device`` x device count. The train step mirrors ``mssar_jax/train/step.py``:
uint8 images normalised on the device with the ImageNet mean/std, forward in train mode with
BatchNorm updates, float32 cross-entropy, SGD momentum 0.9, coupled weight decay 1e-4 on every
parameter, lr 0.1 (``mssar_jax.train.optim``). Eval is the project's eval step (top-1/top-5
counts and loss sum of an inference forward). The state is built on the host from the model's
shapes (``host_state``: no init program to compile). The step is written here, not imported:
``mssar_jax.train.step`` and ``.state`` import ``mssar_jax.config_lib``, which imports
ml_collections, absent on the target machine. This script imports only jax, flax, optax,
numpy and ``mssar_jax.models`` / ``.backends`` / ``.train.optim``; the JSON records what of
TensorFlow, TFDS and ml_collections ended up in ``sys.modules`` (nothing, or it is a bug).

PyTorch arms. ``timm.create_model(name)`` (resnet50, seresnet50), channels-last, autocast bf16
(parameters and the loss in float32), the same uint8 input normalised on the device, SGD
momentum 0.9 with weight decay 1e-4 (fused where available); eval under inference_mode.
The arms run in subprocesses (this file with ``--torch_worker``; one device, batch
``--batch_per_device``): one for the eager arms and one per model for ``torch.compile``
(``--torch_compile_mode``), started first so that PyTorch compiles while XLA does (both
autotune on the same GPU then; ``--torch_start after-jax`` serialises them, in a longer run); a
worker not ready within ``--torch_compile_timeout`` seconds of its start (or, earlier, when
the time budget needs the rest for the rounds) is stopped and its arms are reported as
skipped. Missing torch, timm or CUDA skip the arms with a note. When torch arms run on a GPU,
JAX preallocates ``--jax_memory_fraction`` (0.35) of the device memory instead of 75%, leaving
the rest to the three PyTorch processes.

Timing. Compilation and ``--warmup_steps`` steps are excluded. Then every round times
``--steps`` train steps and ``--steps`` eval steps of every arm in turn (the order rotates each
round), so load from other processes hits all arms alike; outputs are waited for
(``block_until_ready`` / ``torch.cuda.synchronize``) at the end of each timed run. Reported:
medians over rounds of step time and img/s; 'vs none' is the median of per-round ratios of the
step time to the same framework's plain network (JAX: none; timm: resnet50 in the same mode).
MFU = FLOPs per step per device (XLA's cost analysis of the compiled, SPMD-partitioned step)
/ step time / the device's dense bf16 peak (table ``PEAK_FLOPS``; ``--peak_tflops`` overrides;
unknown devices and CPUs: null). timm rows use the FLOPs of the matching JAX arm (none for
resnet50, se for seresnet50). ``--time_budget_seconds`` (counted from start-up) bounds the
run: rounds are dropped when compilation leaves too little time. Reruns compile faster with
JAX's persistent cache (``JAX_COMPILATION_CACHE_DIR``) and PyTorch inductor's (on by default).

Output: a markdown table and the goal lines on stdout (progress on stderr); JSON in ``--json``
(machine, settings, rows, goals, notes, imports).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types

from mssar_jax import datasets  # dataset facts only: no jax, TensorFlow or config library

_T0 = time.monotonic()

FORBIDDEN = ("tensorflow", "tensorflow_datasets", "ml_collections")
GOALS = {"ms_sar_over_none_max": 1.10, "ms_sar_over_seresnet50_compile_min": 1.0}
_PREFIX = "@@accelerator "  # protocol lines of the PyTorch worker; anything else is ignored


# ---------------------------------------------------------------------------------------------
# PyTorch worker (a subprocess; imports torch and timm, never jax).

def _worker_flags(argv) -> argparse.Namespace:
  """The ``--torch_worker`` command line."""
  p = argparse.ArgumentParser(prog="accelerator.py --torch_worker")
  p.add_argument("--mode", choices=("eager", "compile"), required=True)
  p.add_argument("--models", required=True)
  p.add_argument("--batch", type=int, required=True)
  p.add_argument("--image_size", type=int, required=True)
  p.add_argument("--num_classes", type=int, required=True)
  p.add_argument("--warmup_steps", type=int, default=2)
  p.add_argument("--device", default="cuda")
  p.add_argument("--compile_mode", default="default")
  p.add_argument("--timm_kwargs", default="{}")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def _emit(kind, **obj):
  """One protocol line ``@@accelerator KIND {json}`` on stdout."""
  sys.stdout.write(f"{_PREFIX}{kind} {json.dumps(obj)}\n")
  sys.stdout.flush()


def _normalised_class(torch, device_type: str):
  """The wrapper of every timm network: uint8 NHWC in, float32 logits out."""

  class Normalised(torch.nn.Module):
    """uint8 NHWC -> (x - mean) / std in float32, channels-last NCHW; net in bf16 autocast."""

    def __init__(self, net):
      super().__init__()
      self.net = net
      self.register_buffer("mean", torch.tensor(datasets.get("imagenet2012").mean).view(1, 3, 1, 1))
      self.register_buffer("std", torch.tensor(datasets.get("imagenet2012").std).view(1, 3, 1, 1))

    def forward(self, x):
      x = x.permute(0, 3, 1, 2).float().contiguous(memory_format=torch.channels_last)
      x = (x - self.mean) / self.std
      with torch.autocast(device_type, dtype=torch.bfloat16):
        logits = self.net(x)
      return logits.float()

  return Normalised


def _torch_context(torch, F, a) -> types.SimpleNamespace:
  """The worker's device (cuDNN autotuning and TF32 on a GPU), its synchronisation, the
  random uint8 batch and labels (seeded) and the input wrapper, shared by all arms."""
  dev = torch.device(a.device)
  on_cuda = dev.type == "cuda"
  if on_cuda:
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

  def sync():
    if on_cuda:
      torch.cuda.synchronize(dev)

  gen = torch.Generator().manual_seed(a.seed)
  images = torch.randint(0, 256, (a.batch, a.image_size, a.image_size, 3), dtype=torch.uint8,
                         generator=gen).to(dev)
  labels = torch.randint(0, a.num_classes, (a.batch,), generator=gen).to(dev)
  return types.SimpleNamespace(torch=torch, F=F, dev=dev, on_cuda=on_cuda, sync=sync,
                               images=images, labels=labels,
                               Normalised=_normalised_class(torch, dev.type))


def _torch_steps(ctx, fn, opt, num_classes: int):
  """(train step, eval step) of one arm's module ``fn`` (compiled or not) on the batch."""
  F, images, labels = ctx.F, ctx.images, ctx.labels

  def train_step():
    loss = F.cross_entropy(fn(images), labels)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  def eval_step():
    with ctx.torch.inference_mode():
      logits = fn(images)
      top5 = logits.topk(min(5, num_classes), dim=-1).indices
      return ((top5[:, 0] == labels).sum(), (top5 == labels[:, None]).any(-1).sum(),
              F.cross_entropy(logits, labels, reduction="sum"))

  return train_step, eval_step


def _build_torch_arm(ctx, timm, a, name: str):
  """One timm arm built, compiled if asked and warmed up: (module, train step, eval step)."""
  torch = ctx.torch
  torch.manual_seed(a.seed)
  module = ctx.Normalised(timm.create_model(name, num_classes=a.num_classes,
                                            **json.loads(a.timm_kwargs)))
  module = module.to(ctx.dev).to(memory_format=torch.channels_last)
  sgd = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
  try:
    opt = torch.optim.SGD(module.parameters(), fused=ctx.on_cuda, **sgd)
  except (RuntimeError, TypeError, ValueError):
    opt = torch.optim.SGD(module.parameters(), foreach=ctx.on_cuda, **sgd)
  fn = torch.compile(module, mode=a.compile_mode) if a.mode == "compile" else module
  train_step, eval_step = _torch_steps(ctx, fn, opt, a.num_classes)
  module.train()
  for _ in range(max(a.warmup_steps, 1)):
    train_step()
  module.eval()
  for _ in range(max(a.warmup_steps, 1)):
    eval_step()
  ctx.sync()
  return module, train_step, eval_step


def _add_torch_arm(arms: dict, ctx, timm, a, name: str) -> None:
  """Builds arm ``name`` into ``arms`` and reports it (``arm``), or reports why not
  (``arm_error``)."""
  start = time.perf_counter()
  try:
    module, train_step, eval_step = _build_torch_arm(ctx, timm, a, name)
    arms[name] = (module, train_step, eval_step)
    _emit("arm", name=name, seconds=time.perf_counter() - start,
          params=sum(p.numel() for p in module.parameters()))
  except Exception as e:  # pylint: disable=broad-except
    _emit("arm_error", name=name, error=f"{type(e).__name__}: {str(e)[:300]}")
    if ctx.on_cuda:
      ctx.torch.cuda.empty_cache()


def _serve_timings(arms: dict, sync) -> None:
  """Answers each stdin line ``train|eval NAME N`` with the seconds per step of N steps."""
  for line in sys.stdin:
    parts = line.split()
    if not parts:
      continue
    kind, name, n = parts[0], parts[1], int(parts[2])
    module, train_step, eval_step = arms[name]
    step = train_step if kind == "train" else eval_step
    module.train(kind == "train")
    sync()
    start = time.perf_counter()
    for _ in range(n):
      step()
    sync()
    _emit("time", seconds_per_step=(time.perf_counter() - start) / n)


def _torch_worker(argv) -> int:
  """``--torch_worker``: builds and warms the timm arms, then times them on request.

  Protocol: lines ``@@accelerator KIND {json}`` on stdout: ``arm`` / ``arm_error`` per model,
  then ``ready`` (or ``fatal``). Then each stdin line ``train|eval NAME N`` runs N steps and
  answers ``time {"seconds_per_step": s}``. EOF on stdin ends the worker.
  """
  a = _worker_flags(argv)
  try:
    import timm  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  except Exception as e:  # pylint: disable=broad-except
    _emit("fatal", error=f"torch/timm do not import ({type(e).__name__}: {e})")
    return 0
  if a.device.startswith("cuda") and not torch.cuda.is_available():
    _emit("fatal", error=f"torch {torch.__version__} sees no CUDA device")
    return 0
  ctx = _torch_context(torch, F, a)
  arms = {}
  for name in a.models.split(","):
    _add_torch_arm(arms, ctx, timm, a, name)
  _emit("ready", torch=torch.__version__, timm=timm.__version__,
        device=torch.cuda.get_device_name(ctx.dev) if ctx.on_cuda else a.device,
        compile_mode=a.compile_mode if a.mode == "compile" else None)
  _serve_timings(arms, ctx.sync)
  return 0


if __name__ == "__main__" and sys.argv[1:2] == ["--torch_worker"]:
  sys.exit(_torch_worker(sys.argv[2:]))

# ---------------------------------------------------------------------------------------------
# JAX side. Imported after the worker's exit so that the worker never imports jax.

import dataclasses  # noqa: E402
import functools  # noqa: E402
import importlib.util  # noqa: E402
import platform  # noqa: E402
from typing import Any  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from mssar_jax import backends  # noqa: E402
from mssar_jax.models import get_model, input_size, list_models  # noqa: E402
from mssar_jax.train import optim  # noqa: E402
from mssar_jax.train import step as step_lib  # noqa: E402
from mssar_jax.train.state import TrainState  # noqa: E402

P = jax.sharding.PartitionSpec

# Dense bf16 peak FLOP/s per device, by a substring of jax's device_kind (first match wins).
PEAK_FLOPS = (
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
    ("GH200", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12),
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12),
    ("TPU v5", 459e12), ("TPU v6 lite", 918e12), ("TPU v6e", 918e12),
)
TIMM_MODELS = {"resnet50": "resnet50,seresnet50", "resnet101": "resnet101,seresnet101"}
TINY = {"stage_sizes": (1, 1, 1, 1), "width": 8}   # ResNet-50's blocks, 1 per stage, width 8
TINY_IMAGE_SIZE = 128   # last stage 4x4: MS-SAR's ImageNet scales (2, 4) fit
TINY_TIMM = {"layers": (1, 1, 1, 1), "stem_width": 8, "channels": (8, 16, 32, 64)}


def _log(msg: str) -> None:
  print(f"[{time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def peak_flops(device) -> float | None:
  """Dense bf16 peak of one device, or None (CPU, unknown kind)."""
  if device.platform == "cpu":
    return None
  kind = device.device_kind
  for key, flops in PEAK_FLOPS:
    if key.lower() in kind.lower():
      return flops
  return None


def _cost_flops(stage) -> float | None:
  """'flops' of a Lowered or Compiled stage's cost analysis, or None."""
  try:
    cost = stage.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return None
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else None
  try:
    value = float((cost or {}).get("flops", 0.0))
  except (TypeError, ValueError, AttributeError):
    return None
  return value if value > 0 else None


def make_optimizer():
  """SGD momentum 0.9, coupled weight decay 1e-4 on every parameter, lr 0.1 (optim's)."""
  config = types.SimpleNamespace(weight_decay=1e-4, weight_decay_on_bn_and_bias=True,
                                 momentum=0.9, nesterov=False)
  return optim.make_optimizer(config, optax.constant_schedule(0.1))


def host_state(model, tx, image_size: int, seed: int) -> TrainState:
  """A fresh train state built on the host, with no init program to compile (on a GPU that
  is seconds per arm): the shapes of ``model.init``; convolution and dense kernels He-normal
  N(0, 2 / fan_out) (the model's own conv initialiser), BatchNorm scale 1 and running
  variance 1, biases, running means and optimiser buffers 0. A speed benchmark needs the
  shapes and sane magnitudes, not the model's exact random draw."""
  def init(key):
    variables = model.init(key, jnp.zeros((1, image_size, image_size, 3), jnp.float32),
                           train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))

  shapes = jax.eval_shape(init, jax.random.key(seed))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = getattr(path[-1], "key", str(path[-1]))
    shape, dtype = leaf.shape, leaf.dtype
    if name == "kernel":
      fan_out = int(np.prod(shape[:-2])) * shape[-1] if len(shape) > 2 else shape[-1]
      return (rng.standard_normal(shape, np.float32) * np.sqrt(2.0 / fan_out)).astype(dtype)
    return (np.ones if name in ("scale", "var") else np.zeros)(shape, dtype)

  zeros = lambda leaf: np.zeros(leaf.shape, leaf.dtype)  # noqa: E731
  return TrainState(step=zeros(shapes.step),
                    params=jax.tree_util.tree_map_with_path(fill, shapes.params),
                    batch_stats=jax.tree_util.tree_map_with_path(fill, shapes.batch_stats),
                    opt_state=jax.tree.map(zeros, shapes.opt_state))


class JaxArm:
  """One recalibration: compiled train and eval steps over the mesh, timed on demand."""

  def __init__(self, recalibration: str, *, model_name: str, model_kwargs: dict,
               num_classes: int, image_size: int, dtype, impl, mesh, batch, seed: int):
    self.name, self.framework, self.recalibration = f"jax {recalibration}", "jax", recalibration
    model = get_model(model_name, num_classes=num_classes, recalibration=recalibration,
                      dtype=dtype, impl=impl, **model_kwargs)
    tx = make_optimizer()
    replicated = jax.sharding.NamedSharding(mesh, P())
    data = jax.sharding.NamedSharding(mesh, P("data"))

    start = time.perf_counter()
    self.state = jax.device_put(host_state(model, tx, image_size, seed), replicated)
    self.params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.state.params)))
    self.batch = batch
    # The trainer's own steps (uint8 images normalised on the device, float32 loss).
    stats = dataclasses.replace(datasets.get("imagenet2012"), num_classes=num_classes)
    train = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx,
                                      schedule=optax.constant_schedule(0.1), stats=stats),
                    in_shardings=(replicated, data), out_shardings=replicated,
                    donate_argnums=(0,))
    evaluate = jax.jit(functools.partial(step_lib.eval_step, model=model, stats=stats),
                       in_shardings=(replicated, data), out_shardings=replicated)
    lowered_train = train.lower(self.state, batch)
    lowered_eval = evaluate.lower(self.state, batch)
    self._train = lowered_train.compile()
    self._eval = lowered_eval.compile()
    self.compile_seconds = time.perf_counter() - start
    # FLOPs per device: XLA's cost analysis of the compiled (SPMD-partitioned) program; the
    # unoptimised program's total / devices is kept as a cross-check and used instead if the
    # compiled count is missing or under half of it (e.g. library calls a backend's cost
    # analysis does not count).
    n = mesh.devices.size
    self.flops, self.flops_source, self.flops_checks = {}, {}, {}
    for kind, lowered, compiled in (("train", lowered_train, self._train),
                                    ("eval", lowered_eval, self._eval)):
      flops = _cost_flops(compiled)
      total = _cost_flops(lowered)
      check = total / n if total else None
      self.flops_checks[kind] = {"compiled_per_device": flops, "lowered_per_device": check}
      if flops is not None and (check is None or flops >= 0.5 * check):
        self.flops[kind], self.flops_source[kind] = flops, "compiled (per device)"
      else:
        self.flops[kind] = check
        self.flops_source[kind] = "lowered / devices" if check else None

  def warm_up(self, steps: int) -> float:
    """Runs max(steps, 1) train and eval steps; returns the last train step's seconds."""
    last = 0.0
    for _ in range(max(steps, 1)):
      last = self.train_steps(1)
    for _ in range(max(steps, 1)):
      self.eval_steps(1)
    return last

  def train_steps(self, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
      self.state, metrics = self._train(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    return (time.perf_counter() - start) / n

  def eval_steps(self, n: int) -> float:
    start = time.perf_counter()
    outs = [self._eval(self.state, self.batch) for _ in range(n)]
    jax.block_until_ready(outs)
    return (time.perf_counter() - start) / n


class TorchWorker:
  """One ``--torch_worker`` subprocess (eager or compile) and the timm arms it holds."""

  def __init__(self, mode: str, *, python: str, models: str, batch: int, image_size: int,
               num_classes: int, warmup_steps: int, device: str, compile_mode: str,
               timm_kwargs: dict, seed: int):
    self.mode, self.models = mode, models
    self.arms, self.errors, self.info, self.failed = {}, {}, None, None
    self.log = tempfile.NamedTemporaryFile(  # pylint: disable=consider-using-with
        "w+", prefix=f"accelerator_torch_{mode}_", suffix=".log", delete=False)
    cmd = [python, os.path.abspath(__file__), "--torch_worker", "--mode", mode,
           "--models", models, "--batch", str(batch), "--image_size", str(image_size),
           "--num_classes", str(num_classes), "--warmup_steps", str(warmup_steps),
           "--device", device, "--compile_mode", compile_mode,
           "--timm_kwargs", json.dumps(timm_kwargs), "--seed", str(seed)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    self.started = time.monotonic()
    # Its own process group, so that stopping it also stops the compile workers it started.
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,  # pylint: disable=consider-using-with
                                 stderr=self.log, text=True, bufsize=1, env=env,
                                 start_new_session=True)
    self._lines: queue.Queue = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self):
    try:
      for line in self.proc.stdout:
        if line.startswith(_PREFIX):
          kind, _, payload = line[len(_PREFIX):].partition(" ")
          try:
            self._lines.put((kind, json.loads(payload)))
          except ValueError:
            continue
    finally:
      self._lines.put(None)

  def _next(self, deadline: float):
    try:
      item = self._lines.get(timeout=max(deadline - time.monotonic(), 0.01))
    except queue.Empty:
      raise TimeoutError from None
    if item is None:
      raise EOFError
    return item

  def _log_tail(self) -> str:
    try:
      with open(self.log.name, encoding="utf-8", errors="replace") as f:
        lines = [l.strip() for l in f if l.strip()]
      return lines[-1][:300] if lines else "no output"
    except OSError:
      return "no log"

  def wait_ready(self, deadline: float) -> bool:
    while self.info is None and self.failed is None:
      try:
        kind, obj = self._next(deadline)
      except TimeoutError:
        self._fail(f"not ready after {time.monotonic() - self.started:.0f} s (compile timeout "
                   "or time budget); stopped")
        break
      except EOFError:
        self._fail(f"worker exited ({self._log_tail()})")
        break
      if kind == "arm":
        self.arms[obj["name"]] = obj
        _log(f"timm {obj['name']} {self.mode}: ready in {obj['seconds']:.1f} s")
      elif kind == "arm_error":
        self.errors[obj["name"]] = obj["error"]
      elif kind == "fatal":
        self._fail(obj["error"])
      elif kind == "ready":
        self.info = obj
    return self.info is not None and self.failed is None

  def time(self, kind: str, name: str, n: int, timeout: float) -> float | None:
    if self.failed:
      return None
    try:
      self.proc.stdin.write(f"{kind} {name} {n}\n")
      self.proc.stdin.flush()
      _, obj = self._next(time.monotonic() + timeout)
      return float(obj["seconds_per_step"])
    except (TimeoutError, EOFError, OSError, KeyError, ValueError) as e:
      self._fail(f"{kind} {name} failed ({type(e).__name__}; {self._log_tail()})")
      return None

  def _fail(self, why: str):
    self.failed = why
    _log(f"timm {self.models} {self.mode}: {why}")
    self.close(kill=True)

  def _kill(self):
    try:
      os.killpg(self.proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
      self.proc.kill()
    self.proc.wait(timeout=30)

  def close(self, kill: bool = False):
    if self.proc.poll() is None:
      if kill:
        self._kill()
        return
      try:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
      except (OSError, subprocess.TimeoutExpired):
        self._kill()


class TorchArm:
  def __init__(self, worker: TorchWorker, model: str, compile_seconds: float, params: int):
    self.worker, self.model = worker, model
    self.name, self.framework = f"timm {model} {worker.mode}", "torch"
    self.compile_seconds, self.params = compile_seconds, params
    self.estimate = 1.0

  def train_steps(self, n: int) -> float | None:
    return self.worker.time("train", self.model, n, timeout=60 + 20 * n * self.estimate)

  def eval_steps(self, n: int) -> float | None:
    return self.worker.time("eval", self.model, n, timeout=60 + 20 * n * self.estimate)


# ---------------------------------------------------------------------------------------------
# Report.

def _median(xs):
  xs = [x for x in xs if x is not None]
  return statistics.median(xs) if xs else None


def _fmt_rate(x):
  if x is None:
    return "–"
  return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _fmt(x, spec, suffix=""):
  return "–" if x is None else f"{x:{spec}}{suffix}"


def _goal_lines(goals) -> list[str]:
  lines = []
  g = goals["ms_sar_over_none"]
  lines.append(f"- ms_sar / none train step time <= {g['max']:.2f}x: "
               + (f"{g['ratio']:.3f}x: {'met' if g['met'] else 'not met'}"
                  if g["ratio"] is not None else "n/a (needs the none and ms_sar arms)"))
  g = goals["ms_sar_vs_seresnet50_compile"]
  if g["ratio"] is None:
    lines.append("- ms_sar train img/s per device >= timm seresnet50 torch.compile: n/a ("
                 + g["why"] + ")")
  else:
    lines.append(f"- ms_sar train img/s per device >= timm seresnet50 torch.compile: "
                 f"{_fmt_rate(g['ms_sar'])} vs {_fmt_rate(g['seresnet50_compile'])} "
                 f"({g['ratio']:.3f}x): {'met' if g['met'] else 'not met'}")
  return lines


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The benchmark's flags (defined only when it runs, so the module imports anywhere)."""
  fv = {"flag_values": flag_values}
  flags.DEFINE_enum("model", "resnet50", list_models(), "Network of the JAX arms.", **fv)
  flags.DEFINE_boolean("tiny", False, "ResNet-50's blocks with stage_sizes (1,1,1,1), width 8, "
                       "128x128 images (a CPU smoke run); timm arms get the same shape.", **fv)
  flags.DEFINE_integer("image_size", None, "Input size (default: the model's).", **fv)
  flags.DEFINE_integer("num_classes", 1000, "Classifier size.", **fv)
  flags.DEFINE_string("recalibrations", "none,se,ms_sar", "Comma list of the JAX arms' "
                      "recalibrations.", **fv)
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype.", **fv)
  flags.DEFINE_enum("implementation", "auto", list(backends.CHOICES),
                    "How the JAX arms compute their layers (mssar_jax.backends.choose).", **fv)
  flags.DEFINE_integer("batch_per_device", 256, "Batch per device (global: x device count).",
                       **fv)
  flags.DEFINE_integer("steps", 20, "Timed steps per arm per round.", **fv)
  flags.DEFINE_integer("warmup_steps", 2, "Untimed steps per arm after compilation.", **fv)
  flags.DEFINE_integer("rounds", 5, "Timed rounds (medians over them).", **fv)
  flags.DEFINE_float("time_budget_seconds", 330.0, "Whole run, from start-up; rounds are "
                     "dropped to stay within it.", **fv)
  flags.DEFINE_float("peak_tflops", None, "Dense bf16 peak per device (default: from the "
                     "device kind).", **fv)
  flags.DEFINE_string("json", "", "Write the results here ('': not).", **fv)
  flags.DEFINE_boolean("torch", True, "Run the PyTorch / timm arms (--notorch: skip them).",
                       **fv)
  flags.DEFINE_string("torch_models", None, "timm names (default: resnet50,seresnet50 for "
                      "--model resnet50).", **fv)
  flags.DEFINE_string("torch_modes", "eager,compile", "Comma list of eager, compile.", **fv)
  flags.DEFINE_string("torch_compile_mode", "default", "torch.compile's mode.", **fv)
  flags.DEFINE_float("torch_compile_timeout", 240.0, "Seconds from its start for a torch "
                     "worker to build and compile its arms.", **fv)
  flags.DEFINE_string("torch_python", sys.executable, "Interpreter for the torch workers "
                      "(default: this one).", **fv)
  flags.DEFINE_string("torch_device", "cuda", "'cpu' only to test the protocol.", **fv)
  flags.DEFINE_enum("torch_start", "first", ["first", "after-jax"], "Start the torch workers "
                    "before the JAX compilations (they overlap; default) or after them (no "
                    "overlap, longer run).", **fv)
  flags.DEFINE_float("jax_memory_fraction", 0.35, "XLA_PYTHON_CLIENT_MEM_FRACTION when torch "
                     "arms share the GPU (unless already set).", **fv)
  flags.DEFINE_integer("seed", 0, "Seed of the inputs and the parameters.", **fv)


def main(argv) -> int:
  """The benchmark, on the parsed ``flags.FLAGS`` (``app.run``)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  args = flags.FLAGS
  deadline = _T0 + args.time_budget_seconds
  notes: list[str] = []
  recalibrations = [r for r in args.recalibrations.split(",") if r]
  if not recalibrations:
    raise app.UsageError("--recalibrations needs at least one of none, se, ms_sar")
  model_kwargs = dict(TINY) if args.tiny else {}
  if args.tiny and args.model != "resnet50":
    raise app.UsageError("--tiny is ResNet-50's blocks; use it with --model resnet50")
  image_size = args.image_size or (TINY_IMAGE_SIZE if args.tiny else input_size(args.model))

  # PyTorch workers first (before JAX touches the device), so they compile while XLA does;
  # --torch_start after-jax starts them once the JAX arms are compiled and warm instead.
  workers: list[TorchWorker] = []
  plan: list[tuple[str, str]] = []
  torch_models = args.torch_models or TIMM_MODELS.get(args.model)
  if not args.torch:
    notes.append("timm arms: skipped (--notorch)")
  elif not torch_models:
    notes.append(f"timm arms: skipped (no timm counterpart of {args.model}; --torch_models)")
  elif (args.torch_python == sys.executable
        and not (importlib.util.find_spec("torch") and importlib.util.find_spec("timm"))):
    notes.append("timm arms: skipped (torch or timm is not installed)")
  else:
    if args.torch_device.startswith("cuda"):
      os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(args.jax_memory_fraction))
    # One eager worker for all models (quick to build), one compile worker per model (the
    # compilations run in parallel, with XLA's).
    for mode in [m for m in args.torch_modes.split(",") if m]:
      plan += ([(mode, m) for m in torch_models.split(",")] if mode == "compile"
               else [(mode, torch_models)])

  def start_workers():
    for mode, models in plan:
      workers.append(TorchWorker(
          mode, python=args.torch_python, models=models, batch=args.batch_per_device,
          image_size=image_size, num_classes=args.num_classes, warmup_steps=args.warmup_steps,
          device=args.torch_device, compile_mode=args.torch_compile_mode,
          timm_kwargs=TINY_TIMM if args.tiny else {}, seed=args.seed))
    if plan:
      _log(f"started {len(workers)} torch workers: "
           + "; ".join(f"{w.mode} {w.models}" for w in workers))

  if args.torch_start == "first":
    start_workers()
  try:
    return _run(args, deadline, notes, recalibrations, model_kwargs, image_size, workers,
                [m for m in (torch_models or "").split(",") if m],
                start_workers if args.torch_start == "after-jax" else None)
  finally:
    for w in workers:
      w.close()


@dataclasses.dataclass
class _Setup:
  """The JAX side of one run: devices and mesh, dtype, implementation, peak, input batch."""
  devices: list
  mesh: Any
  dtype: Any
  choice: Any
  peak: float | None
  global_batch: int
  batch: dict

  @property
  def n_dev(self) -> int:
    return len(self.devices)


def _setup(args, image_size: int) -> _Setup:
  """Mesh over the local devices, the implementation, the peak and the sharded uint8 batch."""
  devices = jax.local_devices()
  n_dev = len(devices)
  mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
  dtype = jnp.dtype(args.dtype)
  choice = backends.choose(args.implementation, dtype=dtype)
  peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(devices[0])
  global_batch = args.batch_per_device * n_dev
  _log(f"{n_dev} x {devices[0].device_kind} ({jax.default_backend()}), global batch "
       f"{global_batch}, implementation {choice.impl.name} ({choice.reason})")
  return _Setup(devices=devices, mesh=mesh, dtype=dtype, choice=choice, peak=peak,
                global_batch=global_batch,
                batch=_input_batch(args, mesh, global_batch, image_size))


def _input_batch(args, mesh, global_batch: int, image_size: int) -> dict:
  """Random uint8 images, labels and an all-true mask, sharded over the mesh's 'data' axis."""
  rng = np.random.default_rng(args.seed)
  data = jax.sharding.NamedSharding(mesh, P("data"))
  return {
      "image": jax.device_put(rng.integers(0, 256, (global_batch, image_size, image_size, 3),
                                           dtype=np.uint8), data),
      "label": jax.device_put(rng.integers(0, args.num_classes, global_batch, dtype=np.int32),
                              data),
      "mask": jax.device_put(np.ones((global_batch,), bool), data)}


def _build_jax_arms(args, setup: _Setup, recalibrations, model_kwargs, image_size: int,
                    notes: list[str]) -> tuple[list[Any], dict[str, float]]:
  """Compiles and warms one JaxArm per recalibration: (arms, seconds per step after warm-up).
  An arm that runs out of device memory is skipped with a note; other errors propagate."""
  arms: list[Any] = []
  estimates = {}
  for r in recalibrations:
    try:
      arm = JaxArm(r, model_name=args.model, model_kwargs=model_kwargs,
                   num_classes=args.num_classes, image_size=image_size, dtype=setup.dtype,
                   impl=setup.choice.impl, mesh=setup.mesh, batch=setup.batch, seed=args.seed)
      estimates[arm.name] = arm.warm_up(args.warmup_steps)
    except Exception as e:  # pylint: disable=broad-except
      if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
        raise
      notes.append(f"jax {r}: skipped, out of device memory (XLA_PYTHON_CLIENT_MEM_FRACTION="
                   f"{os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', 'default')}; raise "
                   "--jax_memory_fraction or lower --batch_per_device)")
      _log(notes[-1])
      continue
    _log(f"{arm.name}: compiled in {arm.compile_seconds:.1f} s, "
         f"{estimates[arm.name] * 1e3:.1f} ms/step after warm-up")
    arms.append(arm)
  return arms, estimates


def _add_torch_arms(args, deadline: float, workers, torch_models, estimates, arms,
                    notes: list[str]) -> None:
  """Waits for the torch workers, leaving time for at least two rounds, and appends the
  arms of those that are ready to ``arms``; the others' (and failed arms') notes."""
  jax_round = 2 * args.steps * sum(estimates.values())  # train + eval (eval is cheaper)
  per_step = sum(estimates.values()) / max(len(estimates), 1)
  round_estimate = jax_round + 2 * args.steps * per_step * len(torch_models) * 2
  for w in workers:
    reserve = max(15.0, 2 * round_estimate)
    ready_by = min(w.started + args.torch_compile_timeout, deadline - reserve)
    if w.wait_ready(ready_by):
      for name, obj in w.arms.items():
        arm = TorchArm(w, name, obj["seconds"], obj["params"])
        arm.estimate = per_step
        arms.append(arm)
    if w.failed:
      notes.append(f"timm {w.models} {w.mode}: skipped ({w.failed})")
    for name, err in w.errors.items():
      notes.append(f"timm {name} {w.mode}: skipped ({err})")


def _timed_rounds(args, arms, deadline: float, notes: list[str]):
  """Timed rounds, alternating arms; the order rotates each round. Rounds stop early when
  the next would pass the deadline. Returns (train seconds per step by arm and round, eval
  ditto, rounds run)."""
  train_t = {a.name: [] for a in arms}
  eval_t = {a.name: [] for a in arms}
  rounds_run, longest = 0, 0.0
  while rounds_run < args.rounds:
    if rounds_run and time.monotonic() + longest > deadline:
      notes.append(f"rounds reduced from {args.rounds} to {rounds_run} to stay within "
                   f"--time_budget_seconds {args.time_budget_seconds:g}")
      break
    start = time.monotonic()
    k = rounds_run % len(arms)
    for arm in arms[k:] + arms[:k]:
      train_t[arm.name].append(arm.train_steps(args.steps))
      eval_t[arm.name].append(arm.eval_steps(args.steps))
    longest = max(longest, time.monotonic() - start)
    rounds_run += 1
    _log(f"round {rounds_run}: {time.monotonic() - start:.1f} s")
  return train_t, eval_t, rounds_run


def _note_stopped_workers(workers, notes: list[str]) -> None:
  """A note for each torch worker that failed during the timed rounds."""
  for w in workers:
    if w.failed and f"timm {w.models} {w.mode}: skipped ({w.failed})" not in notes:
      notes.append(f"timm {w.models} {w.mode}: stopped during timing ({w.failed})")


def _base_of(arm, torch_models) -> str:
  """The arm whose step time an arm's 'vs none' divides by."""
  if arm.framework == "jax":
    return "jax none"
  return f"timm {torch_models[0]} {arm.worker.mode}"


def _arm_flops(arm, jax_flops: dict) -> tuple[dict, str | None]:
  """(FLOPs per step per device {'train', 'eval'}, where they come from) of an arm; timm
  arms borrow the matching JAX arm's."""
  if arm.framework == "jax":
    return arm.flops, "XLA cost analysis: " + str(arm.flops_source["train"])
  match = "se" if arm.model.startswith("se") else "none"
  flops = jax_flops.get(match, {"train": None, "eval": None})
  return flops, f"the jax {match} arm (same network)" if flops.get("train") else None


def _row(arm, args, setup: _Setup, train_t, eval_t, base_name: str, jax_flops) -> dict:
  """One arm's row of the JSON: medians, img/s, ratio to its base, FLOPs and MFU."""
  tr, ev = train_t[arm.name], eval_t[arm.name]
  base = train_t.get(base_name)
  ratios = ([x / b for x, b in zip(tr, base) if x is not None and b]
            if base is not None else [])
  t_train, t_eval = _median(tr), _median(ev)
  per_dev_batch, peak = args.batch_per_device, setup.peak
  devs = setup.n_dev if arm.framework == "jax" else 1
  flops, flops_from = _arm_flops(arm, jax_flops)
  return {
      "arm": arm.name, "framework": arm.framework,
      "network": args.model if arm.framework == "jax" else arm.model,
      "recalibration": getattr(arm, "recalibration", None),
      "mode": "jit" if arm.framework == "jax" else arm.worker.mode,
      "devices": devs, "batch": per_dev_batch * devs,
      "params": arm.params, "compile_seconds": round(arm.compile_seconds, 2),
      "train_step_ms": t_train * 1e3 if t_train else None,
      "eval_step_ms": t_eval * 1e3 if t_eval else None,
      "train_images_per_second": per_dev_batch * devs / t_train if t_train else None,
      "eval_images_per_second": per_dev_batch * devs / t_eval if t_eval else None,
      "train_images_per_second_per_device": per_dev_batch / t_train if t_train else None,
      "ratio_vs_none": _median(ratios) if ratios else None,
      "ratio_base": base_name if ratios else None,
      "flops_per_step_per_device": flops.get("train"),
      "eval_flops_per_step_per_device": flops.get("eval"),
      "flops_from": flops_from,
      "flops_checks": getattr(arm, "flops_checks", None),
      "mfu": (flops["train"] / t_train / peak) if (peak and t_train and flops.get("train"))
             else None,
      "eval_mfu": (flops["eval"] / t_eval / peak) if (peak and t_eval and flops.get("eval"))
                  else None,
      "train_seconds_per_step_rounds": tr, "eval_seconds_per_step_rounds": ev,
  }


def _goals(rows: list[dict]) -> dict:
  """Each goal with its measured figure and whether it is met (None: not measurable)."""
  by_name = {r["arm"]: r for r in rows}
  ms, none = by_name.get("jax ms_sar"), by_name.get("jax none")
  ratio = ms["ratio_vs_none"] if ms and none else None
  goals = {"ms_sar_over_none": {"ratio": ratio, "max": GOALS["ms_sar_over_none_max"],
                                "met": None if ratio is None
                                else ratio <= GOALS["ms_sar_over_none_max"]}}
  se_c = next((r for r in rows if r["framework"] == "torch" and r["mode"] == "compile"
               and r["network"].startswith("seresnet")), None)
  g = {"ms_sar": None, "seresnet50_compile": None, "ratio": None, "met": None, "why": None}
  if ms is None or ms["train_images_per_second_per_device"] is None:
    g["why"] = "no jax ms_sar arm"
  elif se_c is None or se_c["train_images_per_second_per_device"] is None:
    g["why"] = "no timm seresnet50 torch.compile arm"
  else:
    g["ms_sar"] = ms["train_images_per_second_per_device"]
    g["seresnet50_compile"] = se_c["train_images_per_second_per_device"]
    g["ratio"] = g["ms_sar"] / g["seresnet50_compile"]
    g["met"] = g["ratio"] >= GOALS["ms_sar_over_seresnet50_compile_min"]
  goals["ms_sar_vs_seresnet50_compile"] = g
  return goals


def _forbidden_imports(notes: list[str]) -> list[str]:
  """TensorFlow / TFDS / ml_collections modules imported (the target machine has none of
  them), with a note when there are any."""
  forbidden = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
  if forbidden:
    notes.append(f"imported {', '.join(sorted({m.split('.')[0] for m in forbidden}))}: "
                 "the model zoo / step must not")
  return forbidden


def _result(args, setup: _Setup, *, workers, rows, goals, notes, forbidden, rounds_run,
            recalibrations, model_kwargs, image_size) -> dict:
  """The JSON: machine, settings, rows, goals, notes, imports, elapsed seconds."""
  devices = setup.devices
  return {
      "machine": {
          "backend": jax.default_backend(), "device_kind": devices[0].device_kind,
          "device_count": setup.n_dev, "jax_version": jax.__version__,
          "flax_version": flax.__version__, "optax_version": optax.__version__,
          "python": platform.python_version(), "platform": platform.platform(),
          "peak_flops_per_device": setup.peak,
          "torch": next((w.info for w in workers if w.info), None),
      },
      "settings": {
          "model": args.model, "tiny": args.tiny, "model_kwargs": model_kwargs,
          "image_size": image_size, "num_classes": args.num_classes, "dtype": args.dtype,
          "implementation": setup.choice.impl.name,
          "implementation_reason": setup.choice.reason,
          "batch_per_device": args.batch_per_device, "global_batch": setup.global_batch,
          "steps": args.steps, "warmup_steps": args.warmup_steps,
          "rounds_requested": args.rounds, "rounds": rounds_run,
          "recalibrations": recalibrations, "time_budget_seconds": args.time_budget_seconds,
          "torch_modes": [w.mode for w in workers],
          "torch_compile_mode": args.torch_compile_mode,
          "xla_python_client_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
      },
      "rows": rows, "goals": goals, "notes": notes,
      "imports": {"forbidden": forbidden,
                  "mssar_jax": sorted(m for m in sys.modules if m.split(".")[0] == "mssar_jax"),
                  "torch_in_this_process": "torch" in sys.modules},
      "elapsed_seconds": round(time.monotonic() - _T0, 1),
  }


def _markdown(args, setup: _Setup, result: dict, workers) -> str:
  """The table and the goal lines printed on stdout."""
  n_dev, kind, peak = setup.n_dev, setup.devices[0].device_kind, setup.peak
  torch_info, image_size = result["machine"]["torch"], result["settings"]["image_size"]
  dev_txt = f"{n_dev} x {kind}" if n_dev > 1 else kind
  shape = " (tiny: stage_sizes 1,1,1,1, width 8)" if args.tiny else ""
  out = [f"### {args.model}{shape}, {args.dtype}, {image_size}x{image_size}, batch "
         f"{args.batch_per_device} per device, {dev_txt} ({jax.default_backend()}), "
         f"jax {jax.__version__}"
         + (f", torch {torch_info['torch']} / timm {torch_info['timm']}" if torch_info else ""),
         "",
         f"{result['settings']['rounds']} rounds x {args.steps} steps, medians; vs none: step "
         "time over the same framework's plain network (timm: resnet50 in the same mode); MFU: "
         "XLA FLOPs / step time / "
         + (f"{peak / 1e12:g} TFLOP/s peak" if peak else "peak (unknown here)")
         + "; compile s: build + compile (timm: + warm-up steps)",
         "",
         "| arm | train img/s | eval img/s | step ms | vs none | MFU | compile s |",
         "|---|---:|---:|---:|---:|---:|---:|"]
  for r in result["rows"]:
    out.append(f"| {r['arm']} | {_fmt_rate(r['train_images_per_second'])} | "
               f"{_fmt_rate(r['eval_images_per_second'])} | {_fmt(r['train_step_ms'], '.1f')} | "
               f"{_fmt(r['ratio_vs_none'], '.3f', 'x')} | "
               f"{_fmt(None if r['mfu'] is None else 100 * r['mfu'], '.1f', '%')} | "
               f"{r['compile_seconds']:.1f} |")
  out += ["", "Goals (one H200):", *_goal_lines(result["goals"])]
  if n_dev > 1 and workers:
    out.append(f"- timm arms run on one device; JAX img/s are over {n_dev} devices "
               "(the goal compares per device)")
  out += [f"- note: {n}" for n in result["notes"]]
  forbidden = result["imports"]["forbidden"]
  out.append(f"- imported TensorFlow / TFDS / ml_collections: "
             f"{', '.join(forbidden) if forbidden else 'none'}; "
             f"elapsed {result['elapsed_seconds']:.0f} s")
  return "\n".join(out)


def _run(args, deadline, notes, recalibrations, model_kwargs, image_size, workers,
         torch_models, start_workers) -> int:
  """The run once the torch workers are planned: JAX arms, torch arms, timed rounds, rows,
  goals; the markdown on stdout and the JSON in --json."""
  if jax.process_count() > 1:
    raise SystemExit("error: one process only (data-parallel over its local devices)")
  setup = _setup(args, image_size)
  arms, estimates = _build_jax_arms(args, setup, recalibrations, model_kwargs, image_size,
                                    notes)
  if not arms:
    print("error: no JAX arm could run: " + "; ".join(notes), file=sys.stderr)
    return 1
  if time.monotonic() > deadline:
    notes.append("time budget already spent compiling the JAX arms")
  if start_workers is not None:
    start_workers()
  _add_torch_arms(args, deadline, workers, torch_models, estimates, arms, notes)
  train_t, eval_t, rounds_run = _timed_rounds(args, arms, deadline, notes)
  _note_stopped_workers(workers, notes)

  jax_flops = {a.recalibration: a.flops for a in arms if a.framework == "jax"}
  rows = [_row(arm, args, setup, train_t, eval_t, _base_of(arm, torch_models), jax_flops)
          for arm in arms]
  goals = _goals(rows)
  forbidden = _forbidden_imports(notes)
  result = _result(args, setup, workers=workers, rows=rows, goals=goals, notes=notes,
                   forbidden=forbidden, rounds_run=rounds_run, recalibrations=recalibrations,
                   model_kwargs=model_kwargs, image_size=image_size)
  print(_markdown(args, setup, result, workers), flush=True)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
