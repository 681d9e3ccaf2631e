"""benchmarks/accelerator.py on CPU: the tiny ResNet-50 (JAX arms only) in a subprocess, the
markdown table, the JSON, and no TensorFlow / TFDS / ml_collections import (the GPU machine it
is written for has none of them)."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "accelerator.py"
HEADER = "| arm | train img/s | eval img/s | step ms | vs none | MFU | compile s |"


@pytest.mark.slow
def test_tiny_run_on_cpu(tmp_path):
  out = tmp_path / "accelerator.json"
  # One device and LLVM at -O0: compiling the three tiny networks is most of this test. (The
  # sharded path is the same code with a longer mesh; conftest's compilation cache is kept.)
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1 "
                      "--xla_backend_optimization_level=0"}
  cmd = [sys.executable, str(SCRIPT), "--tiny", "--batch_per_device", "4", "--steps", "2",
         "--warmup_steps", "1", "--rounds", "2", "--notorch", "--time_budget_seconds", "300",
         "--json", str(out)]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env,
                        cwd=tmp_path, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = proc.stdout
  assert HEADER in text
  for r in ("none", "se", "ms_sar"):
    assert f"| jax {r} |" in text
  assert "- ms_sar / none train step time <= 1.10x: " in text
  assert "imported TensorFlow / TFDS / ml_collections: none" in text

  result = json.loads(out.read_text())
  assert set(result) >= {"machine", "settings", "rows", "goals", "notes", "imports"}
  machine = result["machine"]
  assert set(machine) >= {"backend", "device_kind", "device_count", "jax_version",
                          "peak_flops_per_device"}
  assert machine["backend"] == "cpu" and machine["device_count"] == 1
  assert machine["peak_flops_per_device"] is None          # CPU: no MFU
  settings = result["settings"]
  assert settings["tiny"] and settings["image_size"] == 128 and settings["global_batch"] == 4
  assert settings["rounds"] == 2 and settings["dtype"] == "bfloat16"
  rows = {r["arm"]: r for r in result["rows"]}
  assert list(rows) == ["jax none", "jax se", "jax ms_sar"]
  for row in rows.values():
    assert row["train_images_per_second"] > 0 and row["eval_images_per_second"] > 0
    assert row["train_step_ms"] > 0 and row["compile_seconds"] > 0
    assert row["flops_per_step_per_device"] > 0 and row["mfu"] is None
    assert len(row["train_seconds_per_step_rounds"]) == 2
  assert rows["jax none"]["ratio_vs_none"] == 1.0 and rows["jax ms_sar"]["ratio_vs_none"] > 0
  assert rows["jax none"]["params"] < rows["jax se"]["params"] < rows["jax ms_sar"]["params"]
  goals = result["goals"]
  assert goals["ms_sar_over_none"]["max"] == 1.10
  assert goals["ms_sar_vs_seresnet50_compile"]["met"] is None   # no timm arms here
  assert any("--notorch" in n for n in result["notes"])
  imports = result["imports"]
  assert imports["forbidden"] == []
  assert not imports["torch_in_this_process"]
  assert "mssar_jax.config_lib" not in imports["mssar_jax"]
  assert "mssar_jax.train.optim" in imports["mssar_jax"]


def _load_script() -> types.ModuleType:
  spec = importlib.util.spec_from_file_location("accelerator_bench", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # its flax dataclass looks itself up there
  spec.loader.exec_module(module)
  return module


def test_peak_table():
  bench = _load_script()
  device = lambda kind, platform="gpu": types.SimpleNamespace(device_kind=kind,  # noqa: E731
                                                               platform=platform)
  assert bench.peak_flops(device("NVIDIA H200")) == 989e12
  assert bench.peak_flops(device("NVIDIA H100 80GB HBM3")) == 989e12
  assert bench.peak_flops(device("NVIDIA A100-SXM4-80GB")) == 312e12
  assert bench.peak_flops(device("NVIDIA L4")) == 121e12
  assert bench.peak_flops(device("TPU v5 lite", "tpu")) == 197e12
  assert bench.peak_flops(device("TPU v4", "tpu")) == 275e12
  assert bench.peak_flops(device("Some future GPU")) is None
  assert bench.peak_flops(device("cpu", "cpu")) is None
