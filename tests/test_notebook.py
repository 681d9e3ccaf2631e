"""``notebooks/mssar_cifar10.ipynb`` runs headless (nbclient) on a tiny setting: install check,
a 6-step depth-8 width-4 ms_sar run on 512 real CIFAR-10 images, its curves and score maps.

The kernel is this interpreter (a kernelspec written to a temporary JUPYTER_PATH), so a fresh
venv needs no `ipykernel install`. Real CIFAR-10 comes from $MSSAR_TFDS_DATA_DIR (``.ci/run``
sets it); under CI (CI=true) a missing copy fails, elsewhere the test skips.
"""

import json
import os
import pathlib
import re
import sys

import pytest

from tests import tiny

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "mssar_cifar10.ipynb"


def _data_dir():
  return tiny.real_cifar10_dir()


def test_notebook_is_committed_without_outputs():
  import nbformat  # pylint: disable=import-outside-toplevel
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)
  assert "MSSAR_NOTEBOOK_TINY" in code[0].source and "MSSAR_TFDS_DATA_DIR" in code[0].source


@pytest.mark.slow
def test_notebook_runs_headless(tmp_path, monkeypatch):
  import nbformat  # pylint: disable=import-outside-toplevel
  from nbclient import NotebookClient  # pylint: disable=import-outside-toplevel
  data_dir = _data_dir()

  kernels = tmp_path / "jupyter" / "kernels" / "mssar-test"
  kernels.mkdir(parents=True)
  (kernels / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "mssar-jax test", "language": "python"}))
  workdir = tmp_path / "run"
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("MSSAR_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("MSSAR_TFDS_DATA_DIR", data_dir)
  monkeypatch.setenv("MSSAR_NOTEBOOK_WORKDIR", str(workdir))
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
  # One CPU device in the kernel, as for a user (conftest simulates 8 for the other tests).
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 os.environ.get("XLA_FLAGS", "")).strip()
  monkeypatch.setenv("XLA_FLAGS", flags)

  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(nb, timeout=180, kernel_name="mssar-test",
                          resources={"metadata": {"path": str(NOTEBOOK.parent)}})
  client.execute()

  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "6 steps, ms_sar, tiny=True" in text and "done: step 6/6" in text
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) == 2                                   # the curves and the score maps
  result = next(o["data"]["text/plain"] for o in outputs
                if "eval/accuracy" in o.get("data", {}).get("text/plain", ""))
  assert "'eval/num_examples': 200" in result
  assert (workdir / "curves.png").is_file()
  assert (workdir / "score_maps_6.png").is_file()
  assert (workdir / "checkpoints" / "6").is_dir()
