"""The benchmark's quick mode on a tiny network: markdown table and JSON with the expected keys."""

import json

import bench


def test_quick_bench_on_a_tiny_network(tmp_path, capsys):
  out = tmp_path / "bench.json"
  argv = ["--quick", "--set", "depth=8", "--set", "width=4", "--batch-size", "8",
          "--no-pipeline", "--json", str(out)]
  assert bench.main(argv) == 0
  text = capsys.readouterr().out
  assert "| recalibration | params | +params | compile s | peak MB | train img/s |" in text
  for r in ("none", "se", "ms_sar"):
    assert f"| {r} |" in text
  result = json.loads(out.read_text())
  assert set(result) >= {"machine", "settings", "train", "max_rss_mb", "goals"}
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
  assert result["settings"]["batch_size"] == 8 and result["settings"]["rounds"] == 3
  assert set(result["goals"]) >= {"ms_sar_train_ratio", "ms_sar_params_overhead"}


def test_bad_torch_model_is_one_line(capsys):
  argv = ["--quick", "--set", "depth=8", "--set", "width=4", "--batch-size", "4",
          "--recalibrations", "none", "--no-pipeline", "--json", "",
          "--torch-python", "python", "--torch-model", "cifar_densenet40"]
  assert bench.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith("error: --torch-model must be a cifar_resnetN")
