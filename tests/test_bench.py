"""The benchmark's quick mode on a tiny network: markdown tables and JSON with the expected keys.

``benchmarks/bench.py`` is a script, not a package module: it is loaded by path. The input
pipelines read ``$MSSAR_TFDS_DATA_DIR`` (else ``../shared/data/tfds``); where a dataset is
missing the bench reports it skipped, and so does this test.
"""

import importlib.util
import json
import os
import pathlib

import pytest

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_DATA_DIR = pathlib.Path(os.environ.get("MSSAR_TFDS_DATA_DIR")
                         or _ROOT.parent / "shared" / "data" / "tfds")


def _load_bench():
  spec = importlib.util.spec_from_file_location("mssar_bench", _ROOT / "benchmarks" / "bench.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


bench = _load_bench()


def _check_pipeline(p, dataset, batch_size, image_size):
  if not (_DATA_DIR / dataset).is_dir():
    assert "skipped" in p
    return
  assert p["dataset"] == dataset and p["batch_size"] == batch_size
  assert p["image_size"] == image_size
  assert p["images_per_second"] > 0 and p["images_per_cpu_second"] > 0
  assert p["cpu_cores"] == len(os.sched_getaffinity(0))
  assert abs(p["images_per_second_per_core"] * p["cpu_cores"] - p["images_per_second"]) < 1e-6


@pytest.mark.slow
def test_quick_bench_on_a_tiny_network(tmp_path, capsys):
  out = tmp_path / "bench.json"
  argv = ["--quick", "--config.depth=8", "--config.width=4", "--batch_size", "8",
          "--data_dir", str(_DATA_DIR), "--pipeline_batches", "5", "--shuffle_buffer", "256",
          "--imagenet_batch_size", "8", "--imagenet_batches", "3", "--json", str(out)]
  assert bench.main(argv) == 0
  text = capsys.readouterr().out
  assert "| recalibration | params | +params | compile s | peak MB | train img/s |" in text
  for r in ("none", "se", "ms_sar"):
    assert f"| {r} |" in text
  result = json.loads(out.read_text())
  assert set(result) >= {"machine", "settings", "train", "max_rss_mb", "goals", "pipeline",
                         "imagenet_pipeline", "compile_cache"}
  rows = result["train"]
  assert list(rows) == ["none", "se", "ms_sar"]
  for row in rows.values():
    assert set(row) >= {"params", "params_overhead", "compile_seconds", "peak_mb",
                        "train_images_per_second", "train_ratio_vs_none",
                        "train_cpu_ratio_vs_none", "eval_images_per_second",
                        "eval_ratio_vs_none"}
    assert row["train_images_per_second"] > 0 and row["compile_seconds"] > 0
  assert rows["none"]["params"] < rows["se"]["params"] < rows["ms_sar"]["params"]
  assert rows["none"]["train_ratio_vs_none"] == 1.0
  settings = result["settings"]
  assert settings["batch_size"] == 8 and settings["rounds"] == 3
  assert settings["implementation"] == "auto" and settings["implementation_name"]
  assert set(result["goals"]) >= {"ms_sar_train_ratio", "ms_sar_params_overhead"}

  # Input pipelines: CIFAR-10 and ImageNet train streams, per core.
  _check_pipeline(result["pipeline"], "cifar10", 8, 32)
  _check_pipeline(result["imagenet_pipeline"], "imagenet2012", 8, 224)
  if "skipped" not in result["imagenet_pipeline"]:
    assert "| input pipeline" in text and "| imagenet2012 224px" in text
    assert "pipeline_over_train" in result["goals"]

  # Persistent compilation cache: an empty cache in one process, reused by a second one.
  cache = result["compile_cache"]
  assert cache["model"] == "cifar_resnet20:ms_sar" and cache["batch_size"] == 8
  assert cache["model_kwargs"] == {"depth": "8", "width": "4"}
  first, second = cache["first"], cache["second"]
  assert first["cache_hits"] == 0 and first["entries_written"] >= 1
  assert second["cache_hits"] == 1 and second["entries_written"] == 0
  assert cache["cache_entries"] >= 1
  assert second["compile_seconds"] < first["compile_seconds"]  # a load, not a compilation
  assert cache["speedup"] == first["seconds"] / second["seconds"]
  assert "| empty (first process) |" in text and "| reused (second process) |" in text


def test_bad_torch_model_is_one_line(capsys):
  argv = ["--quick", "--config.depth=8", "--config.width=4", "--batch_size", "4",
          "--recalibrations", "none", "--nopipeline", "--nocompile_cache", "--json", "",
          "--torch_python", "python", "--torch_model", "cifar_densenet40"]
  assert bench.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith("error: --torch_model must be a cifar_resnetN")
