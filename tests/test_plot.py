"""``mssar-plot``: curves of several runs, legends from their configs."""

import json
import os
import subprocess
import sys

from PIL import Image
import pytest

from mssar_jax.cli import plot
from mssar_jax.errors import ConfigError


def _run(root, name, config, records):
  workdir = root / name
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(config))
  lines = [json.dumps(r) for r in records]
  (workdir / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"step": 9, "train/lo')
  return str(workdir)


def _records(offset):
  out = []
  for step in range(10, 61, 10):
    r = {"step": step, "train/loss": 2.3 - step / 100 + offset,
         "train/accuracy": 0.1 + step / 200, "train/learning_rate": 0.1 if step <= 30 else 0.01}
    if step % 30 == 0:
      r.update({"eval/accuracy": 0.2 + step / 300 - offset, "eval/loss": 2.0,
                "eval/num_examples": 10000})
    out.append(r)
  return out


@pytest.fixture
def workdirs(tmp_path):
  base = {"model": "cifar_resnet20", "recalibration": "ms_sar", "seed": 0, "batch_size": 64,
          "data_dir": "/a", "recalibration_kwargs": {"scales": [2, 4, 8]}}
  return [
      _run(tmp_path, "a", base, _records(0.0)),
      _run(tmp_path, "b", {**base, "seed": 1, "data_dir": "/b"}, _records(0.05)),
      _run(tmp_path, "c", {**base, "recalibration": "se", "recalibration_kwargs": {}},
           _records(0.1)),
  ]


def test_labels_name_model_and_the_differing_keys(workdirs):
  runs = [plot.read_run(w) for w in workdirs]
  assert len(runs[0]["records"]) == 6                      # the torn last line is ignored
  # data_dir is not a difference; scales only differ with the recalibration, which says it.
  assert plot.labels(runs) == ["cifar_resnet20 + ms_sar, seed=0",
                               "cifar_resnet20 + ms_sar, seed=1", "cifar_resnet20 + se, seed=0"]
  other = dict(runs[1], config={**runs[1]["config"], "recalibration_kwargs.scales": (2, 4)})
  assert plot.labels([runs[0], other]) == [
      "cifar_resnet20 + ms_sar, seed=0, scales=(2,4,8)",
      "cifar_resnet20 + ms_sar, seed=1, scales=(2,4)"]
  assert plot.labels(runs[:1]) == ["cifar_resnet20 + ms_sar"]
  same = [runs[0], dict(runs[0], workdir="/x/again")]
  assert plot.labels(same) == ["cifar_resnet20 + ms_sar (a)", "cifar_resnet20 + ms_sar (again)"]
  steps, values = plot.series(runs[0]["records"], "eval/accuracy")
  assert steps == [30, 60] and values == pytest.approx([0.3, 0.4])


def test_plot_command_writes_one_png(workdirs, tmp_path):
  out = str(tmp_path / "out" / "curves.png")
  done = subprocess.run([sys.executable, "-m", "mssar_jax.cli.plot", *workdirs, "--out", out,
                         "--color_by", "recalibration", "--title", "three runs"],
                        capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.strip() == out
  width, height = Image.open(out).size
  assert width == 1500 and 400 <= height <= 500
  assert plot.plot_runs([workdirs[0]], str(tmp_path / "one.png")) == str(tmp_path / "one.png")
  assert os.path.isfile(tmp_path / "one.png")
  with pytest.raises(ConfigError, match="metrics.jsonl not found"):
    plot.plot_runs([str(tmp_path / "nothing")], str(tmp_path / "x.png"))
