"""``python -m mssar_jax.study``: trains the variants x seeds and writes results.md + curves.png.

One real (tiny, mock-data) training goes through the command; the table is checked on
synthetic workdirs of all three variants and two seeds written as the trainer writes them.
"""

import json
import os

import jax
import pytest

from mssar_jax import metrics_writer, study

TINY = ["--set", "model_kwargs.depth=8", "--set", "model_kwargs.width=4",
        "--set", "batch_size=16", "--set", "eval_batch_size=24", "--set", "shuffle_buffer=48",
        "--set", "async_checkpointing=False"]


def _fake_run(root, variant, seed, accuracy, ips, steps=4):
  """A workdir with config.json, metrics.jsonl and TensorBoard events, no checkpoint."""
  config = study.run_config(variant, seed, steps=steps, data_dir="/data",
                            overrides=study.parse_set(TINY[1::2]))
  workdir = str(root / f"{variant}_seed{seed}")
  os.makedirs(workdir)
  metrics_writer.write_config(workdir, config)
  writer = metrics_writer.MetricsWriter(workdir)
  for step in range(1, steps + 1):
    record = {"train/loss": 2.3 - 0.1 * step, "train/learning_rate": 0.1}
    if step % 2 == 0:
      record.update({"eval/accuracy": accuracy - 0.01 * (steps - step), "eval/loss": 2.0,
                     "eval/num_examples": 10000})
    writer.write(step, record, {"perf/images_per_second": ips + step})
  writer.close()
  return workdir


def test_table_from_existing_workdirs(tmp_path):
  runs = tmp_path / "runs"
  values = {("none", 0): 0.40, ("none", 1): 0.42, ("se", 0): 0.41, ("se", 1): 0.45,
            ("ms_sar", 0): 0.44, ("ms_sar", 1): 0.44}
  for (variant, seed), acc in values.items():
    _fake_run(runs, variant, seed, acc, ips={"none": 200, "se": 190, "ms_sar": 150}[variant])
  out = tmp_path / "docs"
  assert study.main(["--runs", str(runs), "--out", str(out), "--report_only"]) == 0
  text = (out / "results.md").read_text()
  assert (out / "curves.png").is_file() and "![curves](curves.png)" in text
  rows = [line for line in text.splitlines() if line.startswith("| ")]
  # Header, then one line per variant in none / se / ms_sar order, then the per-run table.
  assert rows[1].startswith("| none | 0, 1 | 41.00% ± 1.41% | 40.00% - 42.00% | 204 |")
  assert rows[2].startswith("| se | 0, 1 | 43.00% ± 2.83% | 41.00% - 45.00% | 194 |")
  assert rows[3].startswith("| ms_sar | 0, 1 | 44.00% ± 0.00% | 44.00% - 44.00% | 154 |")
  params = [int(r.split("|")[6].replace(",", "")) for r in rows[1:4]]
  assert params[0] < params[1] < params[2] and "| +0.00% |" in rows[1]
  assert "| ms_sar_seed1 | ms_sar | 1 | 44.00% |" in text
  assert "6 runs, 4 steps of batch 16 each" in text and "Warning" not in text
  assert "Machine: not recorded" in text
  assert f"python -m mssar_jax.study --runs {runs} --out {out} --report_only" in text

  _fake_run(runs, "se", 2, 0.5, 100, steps=6)          # a run of another length is flagged
  assert study.main(["--runs", str(runs), "--out", str(out), "--report_only"]) == 0
  assert "**Warning: the runs differ in steps**" in (out / "results.md").read_text()


def test_study_trains_skips_finished_runs_and_reports(tmp_path, mock_tfds, capsys):
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  runs, out = tmp_path / "runs", tmp_path / "docs"
  argv = ["--steps", "2", "--seeds", "3", "--variants", "ms_sar", "--evals", "1",
          "--data_dir", "", "--runs", str(runs), "--out", str(out), *TINY]
  try:
    with mock_tfds(48):
      assert study.main(argv) == 0
      assert "study: training ms_sar_seed3 (2 steps)" in capsys.readouterr().out
      assert study.main(argv) == 0                      # finished runs are not retrained
      assert "ms_sar_seed3 already finished; skipped" in capsys.readouterr().out
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)
  config = json.load(open(runs / "ms_sar_seed3" / "config.json"))
  assert config["seed"] == 3 and config["num_train_steps"] == 2
  assert config["model_kwargs"]["depth"] == 8 and config["checkpoint_every_steps"] == 0
  text = (out / "results.md").read_text()
  assert "| ms_sar | 3 | " in text and "± n/a (1 seed) |" in text
  assert "python -m mssar_jax.study --steps 2 --seeds 3" in text
  assert ("python train.py --config configs/cifar.py:cifar10,cifar_resnet20,ms_sar,local "
          f"--workdir {runs / 'ms_sar_seed3'}") in text
  assert "--config.model_kwargs.depth=8" in text and "--config.seed=3" in text
  workdir = str(runs / "ms_sar_seed3")
  ips = study.images_per_second(workdir)
  assert ips > 0 and study.eval_seconds(workdir, 16, ips) >= 0.0  # eval at 2, log at 1
  state = json.load(open(runs / "study.json"))
  assert state["runs"]["ms_sar_seed3"]["wall_seconds"] > 0
  assert "with 8 JAX cpu device(s)" in text

  assert study.main([*argv[:1], "3", *argv[2:]]) == 1   # same runs dir, other --steps
  assert "holds a study of cifar10,cifar_resnet20 with 2 steps" in capsys.readouterr().err


def test_calibration_fits_the_slowest_variant_into_the_budget(monkeypatch):
  from mssar_jax import train  # pylint: disable=import-outside-toplevel
  clock = iter([0.0, 120.0])                 # the 60-step calibration run takes 120 s:
  monkeypatch.setattr(study.time, "time", lambda: next(clock, 120.0))
  monkeypatch.setattr(train, "train_and_evaluate", lambda config, workdir: {"step": 60})
  monkeypatch.setattr(study, "images_per_second", lambda workdir: 64.0)   # 60 s training,
  monkeypatch.setattr(study, "eval_seconds", lambda workdir, batch, ips: 20.0)  # 2 x 20 s eval
  steps = study.calibrate_steps(15, base="cifar10,cifar_resnet20", data_dir=None, overrides={},
                                batch_size=64, calibration_steps=60, evals=4)
  assert steps == 800    # 20 s one-off; (900 s - 20 s - 4 evals x 20 s) x 64 img/s / 64


def test_command_helpers():
  assert study.parse_set(["a.b=8", "c=(2, 4)", "d=text"]) == {"a.b": 8, "c": (2, 4), "d": "text"}
  with pytest.raises(study.ConfigError, match="use key=value"):
    study.parse_set(["oops"])
  with pytest.raises(study.ConfigError, match="no such config key"):
    study.run_config("se", 0, steps=10, overrides={"model_kwargs.nope": 1})
  c = study.run_config("se", 1, steps=1000, data_dir="/d")
  assert (c.num_train_steps, c.seed, c.eval_every_steps, c.data_dir) == (1000, 1, 250, "/d")
  assert study._with_steps(["--minutes", "15", "--seeds", "0,1"], 2000) == (  # pylint: disable=protected-access
      "python -m mssar_jax.study --steps 2000 --seeds 0,1")
  assert study.main(["--runs", "/nonexistent/x", "--report_only"]) == 1
  assert study.main(["--seeds", "0"]) == 1
