"""benchmarks/study.py: the report's numbers on hand-made run records, that it reads nothing but
those records, and train -> report end to end on two tiny real runs."""

import concurrent.futures
import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import pytest

from mssar_jax import cpu_process
from tests import tiny

_SPEC = importlib.util.spec_from_file_location("study", tiny.ROOT / "benchmarks" / "study.py")
study = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(study)

# Fake runs: 16 steps of batch 100 on train[:400] (4 steps per epoch), an evaluation every
# 4 steps, a log line every 2; training takes 0.5 s a step (+ 0.1 s per seed).
EVALS = {  # (variant, seed): test accuracy at steps 4, 8, 12, 16
    ("none", 0): [0.50, 0.80, 0.84, 0.83],
    ("none", 1): [0.55, 0.82, 0.86, 0.85],
    ("se", 0): [0.52, 0.83, 0.85, 0.86],
    ("ms_sar", 0): [0.60, 0.86, 0.88, 0.89],
    ("ms_sar", 1): [0.58, 0.84, 0.87, 0.90],
    ("ms_sar", 2): [0.60, 0.80, 0.85, 0.87],
}
OTHER_CPU = {("none", 1): 0.2}


def _seconds(seed, step):
  return round(step * (0.5 + 0.1 * seed), 3)


def write_fake_run(runs, variant, seed, accuracies):
  name = f"{variant}_seed{seed}"
  d = runs / name
  d.mkdir(parents=True)
  config = {"batch_size": 100, "train_split": "train[:400]", "eval_split": "test",
            "num_epochs": 4, "num_train_steps": -1, "learning_rate": 0.1,
            "reference_batch_size": 100, "lr_schedule": "step", "lr_boundaries": [0.5, 0.75],
            "lr_decay_factor": 0.1, "momentum": 0.9, "nesterov": False, "warmup_steps": 0,
            "weight_decay": 0.0001, "weight_decay_on_bn_and_bias": True,
            "eval_every_steps": 4, "log_every_steps": 2, "recalibration": variant,
            "seed": seed, "model": "cifar_resnet20", "model_kwargs": {"depth": 20}}
  (d / "config.json").write_text(json.dumps(config, indent=2) + "\n")
  metrics, perf = [], []
  for step in range(2, 17, 2):
    record = {"step": step, "train/accuracy": 0.5, "train/learning_rate": 0.1,
              "train/loss": 2.0 / step + seed}
    if step % 4 == 0:
      record.update({"eval/loss": 1.0, "eval/accuracy": accuracies[step // 4 - 1],
                     "eval/num_examples": 10000})
    metrics.append(record)
    perf.append({"step": step, "train_seconds": _seconds(seed, step),
                 "images_per_second": 123.0})
  (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
  (d / "perf.jsonl").write_text("".join(json.dumps(r) + "\n" for r in perf))
  summary = {"name": name, "variant": variant, "seed": seed, "steps": 16,
             "test_accuracy": accuracies[-1], "train_seconds": _seconds(seed, 16),
             "images_per_second": round(16 * 100 / _seconds(seed, 16), 1),
             "other_cpu_share": OTHER_CPU.get((variant, seed), 0.01),
             "finished": "2026-12-01T10:00:00+00:00", "commit": "abc123def456",
             "cpu": "Test CPU", "cores": 2, "avx512": True, "python": "3.12.1",
             "command": f"python train.py --config=configs/cifar.py:cifar10,cifar_resnet20,"
                        f"{variant} --workdir=/w/{name} --config.seed={seed}"}
  (d / "summary.json").write_text(json.dumps(summary) + "\n")


@pytest.fixture
def fake_runs(tmp_path):
  runs = tmp_path / "runs"
  for (variant, seed), accuracies in EVALS.items():
    write_fake_run(runs, variant, seed, accuracies)
  (runs / "PAUSE").write_text("")
  (runs / "se_seed1").mkdir()  # an unfinished run: no summary.json, not a record
  (runs / "se_seed1" / "metrics.jsonl").write_text('{"step": 4, "eval/accuracy": 0.99}\n')
  # A decoy workdir outside --runs with other numbers: the report must not see it.
  decoy = tmp_path / "workdirs" / "none_seed2"
  write_fake_run(tmp_path / "workdirs", "none", 2, [0.9, 0.95, 0.97, 0.99])
  (decoy / "checkpoints").mkdir()
  (decoy / "tensorboard").mkdir()
  return runs


def _report(fake_runs, tmp_path):
  """`study.py report` on the fake runs: (output directory, the runs loaded, their analysis)."""
  out = tmp_path / "out"
  assert study.main(["report", "--runs", str(fake_runs), "--out", str(out)]) == 0
  runs, problems = study.load_runs(str(fake_runs))
  assert problems == []
  assert sorted(r.name for r in runs) == sorted(f"{v}_seed{s}" for v, s in EVALS)
  a = study.analyse(runs)
  assert a["variants"] == ["none", "se", "ms_sar"]
  return out, runs, a


def test_report_per_variant_and_paired_numbers_match_hand_computation(fake_runs, tmp_path):
  _, _, a = _report(fake_runs, tmp_path)

  # Per variant: final accuracy mean and sample std, last-3 mean.
  pv = a["per_variant"]
  assert pv["none"]["seeds"] == [0, 1] and pv["ms_sar"]["seeds"] == [0, 1, 2]
  assert pv["none"]["final"]["mean"] == pytest.approx((0.83 + 0.85) / 2)
  assert pv["none"]["final"]["std"] == pytest.approx(math.sqrt(2 * 0.01 ** 2))  # |0.83-0.85|/sqrt2
  assert pv["se"]["final"]["std"] is None
  ms_last3 = [(0.86 + 0.88 + 0.89) / 3, (0.84 + 0.87 + 0.90) / 3, (0.80 + 0.85 + 0.87) / 3]
  assert pv["ms_sar"]["last3"]["mean"] == pytest.approx(sum(ms_last3) / 3)
  assert pv["ms_sar"]["best"]["mean"] == pytest.approx((0.89 + 0.90 + 0.87) / 3)

  # Paired ms_sar - none over the seeds both have (0, 1): 0.89-0.83 = 0.06, 0.90-0.85 = 0.05.
  pairs = {(p["a"], p["b"]): p for p in a["pairs"]}
  assert list(pairs)[:3] == [("ms_sar", "se"), ("ms_sar", "none"), ("se", "none")]
  p = pairs[("ms_sar", "none")]
  assert p["seeds"] == [0, 1]
  assert p["final"]["mean"] == pytest.approx(0.055)
  sd = math.sqrt(((0.06 - 0.055) ** 2 + (0.05 - 0.055) ** 2) / (2 - 1))
  assert p["final"]["se"] == pytest.approx(sd / math.sqrt(2))  # 0.005
  assert p["final"]["se"] == pytest.approx(0.005)
  assert p["final"]["ci95"] == pytest.approx(12.7062 * 0.005, rel=1e-4)  # t(0.975, 1 dof)
  assert (p["final"]["min"], p["final"]["max"]) == (pytest.approx(0.05), pytest.approx(0.06))
  d_last3 = [ms_last3[0] - (0.80 + 0.84 + 0.83) / 3, ms_last3[1] - (0.82 + 0.86 + 0.85) / 3]
  assert p["last3"]["mean"] == pytest.approx(sum(d_last3) / 2)
  assert p["last3"]["se"] == pytest.approx(abs(d_last3[0] - d_last3[1]) / 2)
  # ms_sar - se: seed 0 only, n = 1, no SE.
  p = pairs[("ms_sar", "se")]
  assert p["seeds"] == [0] and p["final"]["mean"] == pytest.approx(0.89 - 0.86)
  assert p["final"]["se"] is None and p["final"]["ci95"] is None


def test_report_time_to_accuracy_matches_hand_computation(fake_runs, tmp_path):
  _, _, a = _report(fake_runs, tmp_path)
  pv = a["per_variant"]

  # Time to accuracy: the first evaluation >= threshold and perf.jsonl's seconds there.
  pr = a["per_run"]
  assert pr["ms_sar_seed0"]["reach"][0.85] == (8, pytest.approx(_seconds(0, 8)))
  assert pr["ms_sar_seed1"]["reach"][0.88] == (16, pytest.approx(_seconds(1, 16)))
  assert pr["none_seed0"]["reach"][0.85] is None and pr["none_seed0"]["best"] == (0.84, 12)
  assert pr["ms_sar_seed2"]["reach"][0.88] is None
  reach = pv["ms_sar"]["reach"][0.85]  # steps 8, 12, 12
  assert (reach["reached"], reach["of"]) == (3, 3)
  assert reach["steps"] == pytest.approx(32 / 3)
  assert reach["seconds"] == pytest.approx((_seconds(0, 8) + _seconds(1, 12)
                                            + _seconds(2, 12)) / 3)


def test_report_markdown_shows_the_hand_computed_numbers(fake_runs, tmp_path):
  out, _, _ = _report(fake_runs, tmp_path)

  # The markdown shows the same numbers.
  text = (out / "results.md").read_text()
  # 95% CI: 5.50 -+ t(0.975, 1 dof) 12.706 * 0.50 = -0.85 to +11.85.
  assert "| ms_sar - none | 0, 1 (2) | +5.50 | 0.50 | -0.85 to +11.85 | +5.00 to +6.00 |" in text
  assert "| ms_sar - se | 0 (1) | +3.00 | n/a | n/a | +3.00 to +3.00 |" in text
  assert "| none | 0, 1 | 84.00% ± 1.41 |" in text
  assert "not reached (best 84.00% at step 12)" in text
  assert f"step 8 (epoch 2.0), {_seconds(0, 8) / 60:.1f} min" in text
  assert "20% machine shared" in text and "| 1% |" in text
  assert "4 epochs (16 steps of batch 100, 4 steps per epoch on `train[:400]`)" in text
  assert "steps 8, 12" in text and "abc123def456" in text
  assert "--workdir=/w/ms_sar_seed2 --config.seed=2" in text
  assert "none_seed2" not in text and "99.00%" not in text  # the decoy workdir
  assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # The curves' epoch axis: steps / (400 // 100).
  assert study.Run(str(fake_runs / "none_seed0")).steps_per_epoch == 4


def test_report_reads_only_the_records_and_needs_no_jax(fake_runs, tmp_path):
  """In a fresh process with an audit hook: every file opened under tmp_path is one of the
  four record files of a recorded run or an output; JAX and TensorFlow are not imported."""
  out = tmp_path / "out"
  script = f"""
import json, os, runpy, sys
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0]))
                 if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) else None)
sys.argv = ["study.py", "report", "--runs", {str(fake_runs)!r}, "--out", {str(out)!r}]
try:
  runpy.run_path({str(tiny.ROOT / "benchmarks" / "study.py")!r}, run_name="__main__")
except SystemExit as e:
  assert not e.code, e.code
print(json.dumps({{"opened": [p for p in opened if p.startswith({str(tmp_path)!r})],
                  "modules": [m for m in ("jax", "tensorflow", "flax") if m in sys.modules]}}))
"""
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=120, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  seen = json.loads(proc.stdout.strip().splitlines()[-1])
  opened = {os.path.relpath(p, tmp_path) for p in seen["opened"]}
  assert seen["modules"] == []
  records = {f"runs/{v}_seed{s}/{f}" for v, s in EVALS for f in study.REPORT_FILES}
  outputs = {"out/results.md", "out/curves.png"}
  assert opened <= records | outputs, opened - records - outputs
  assert records <= opened and "out/results.md" in opened
  assert (out / "results.md").exists() and (out / "curves.png").exists()


def test_split_examples():
  assert study.split_examples("train") == 50_000
  assert study.split_examples("train[:512]") == 512
  assert study.split_examples("train[100:600]") == 500
  assert study.split_examples("train[10%:]") == 45_000
  assert study.split_examples("train[-1000:]") == 1000


def test_suffixed_variant_is_its_own_variant(tmp_path):
  runs = tmp_path / "runs"
  write_fake_run(runs, "ms_sar", 0, [0.5, 0.6, 0.7, 0.8])
  write_fake_run(runs, "none", 0, [0.5, 0.6, 0.7, 0.75])
  # The follow-up study's variant: recorded as ms_sar_zero_seed0, recalibration ms_sar.
  write_fake_run(runs, "ms_sar", 1, [0.5, 0.6, 0.7, 0.9])
  os.rename(runs / "ms_sar_seed1", runs / "ms_sar_zero_seed0")
  summary = json.loads((runs / "ms_sar_zero_seed0" / "summary.json").read_text())
  summary.update(name="ms_sar_zero_seed0", seed=0)
  (runs / "ms_sar_zero_seed0" / "summary.json").write_text(json.dumps(summary) + "\n")
  loaded, _ = study.load_runs(str(runs))
  a = study.analyse(loaded)
  assert a["variants"] == ["none", "ms_sar", "ms_sar_zero"]
  pairs = {(p["a"], p["b"]): p for p in a["pairs"]}
  assert pairs[("ms_sar_zero", "ms_sar")]["final"]["mean"] == pytest.approx(0.1)
  assert pairs[("ms_sar_zero", "none")]["final"]["mean"] == pytest.approx(0.15)
  assert pairs[("ms_sar", "se")]["seeds"] == []
  text = study.render_markdown(loaded, a, [], command="x")
  assert "| ms_sar_zero | 0 |" in text and "| ms_sar - se | se not recorded yet |" in text


@pytest.mark.slow
def test_train_then_report_on_two_tiny_real_runs(tmp_path, monkeypatch):
  """`study.py train` on a slice of the real CIFAR-10 (depth 8, width 4, 8 steps of 32), two
  variants, one seed, recorded into tmp; then `report` on those records."""
  data_dir = tiny.real_cifar10_dir()
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  # The malloc tunables set beforehand, as .ci/run does: train.py need not re-run itself.
  monkeypatch.setenv("GLIBC_TUNABLES", cpu_process.environment()["GLIBC_TUNABLES"])
  out = tmp_path / "records"
  settings = ["num_train_steps=8", "batch_size=32", "train_split=train[:256]",
              "eval_split=test[:200]", "eval_batch_size=100", "eval_every_steps=4",
              "log_every_steps=2", "checkpoint_every_steps=0", "shuffle_buffer=256",
              "model_kwargs.depth=8", "model_kwargs.width=4"]
  argv = ["train", "--data_dir", data_dir, "--runs", str(tmp_path / "workdirs"),
          "--out", str(out), "--seeds", "0"]
  argv += [f"--config.{s}" for s in settings]
  # The two variants side by side (most of a tiny run is its single-threaded start-up).
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    codes = list(pool.map(study.main, [argv + ["--variants", v] for v in ("none", "ms_sar")]))
  assert codes == [0, 0]
  assert sorted(os.listdir(out)) == ["ms_sar_seed0", "none_seed0"]
  for name in ("none_seed0", "ms_sar_seed0"):
    assert sorted(os.listdir(out / name)) == sorted(study.REPORT_FILES)
    summary = json.loads((out / name / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["name"] == name
    assert "--config.eval_every_steps=4" in summary["command"]
    config = json.loads((out / name / "config.json").read_text())
    assert config["eval_every_steps"] == 4 and config["model_kwargs"]["depth"] == 8
    lines = (out / name / "metrics.jsonl").read_text().splitlines()
    evals = [r for r in map(json.loads, lines) if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [4, 8] and evals[-1]["eval/num_examples"] == 200
  started = time.time()  # both recorded: skipped, nothing is trained again
  assert study.main(argv + ["--variants", "none,ms_sar"]) == 0
  assert time.time() - started < 5

  report_dir = tmp_path / "report"
  assert study.main(["report", "--runs", str(out), "--out", str(report_dir)]) == 0
  text = (report_dir / "results.md").read_text()
  for v in ("none", "ms_sar"):
    assert f"\n| {v} | 0 | " in text
  assert "| ms_sar - none | 0 (1) |" in text
  assert "1 epoch (8 steps of batch 32, 8 steps per epoch on `train[:256]`)" in text
  assert (report_dir / "curves.png").stat().st_size > 10_000
