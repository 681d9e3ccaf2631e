"""``notebooks/mssar_cifar10.ipynb`` as committed, and run headless (nbclient) as on a fresh runtime.

The headless run executes the notebook from a temporary directory outside the checkout, on a
kernel whose Python cannot import mssar_jax: a fresh venv whose site-packages holds one .pth
line naming this environment's site-packages. Python adds that directory to sys.path but does
not process the .pth files inside it, so jax, flax, TensorFlow and ipykernel are importable
while the editable install's finder for mssar_jax is not. The notebook's first cell therefore
installs the package, from this checkout ($MSSAR_INSTALL_FROM), offline (pip --no-index), into
the temporary venv. The form fields (#@param lines) are edited in memory for a tiny setting: a
6-step depth-8 width-4 ms_sar run on 512 real CIFAR-10 images, its curves and score maps.
Real CIFAR-10 comes from $MSSAR_TFDS_DATA_DIR (``.ci/run`` sets it); under CI (CI=true) a
missing copy fails, elsewhere the test skips.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import sysconfig

import pytest

from tests import tiny

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "mssar_cifar10.ipynb"
COLAB_URL = ("https://colab.research.google.com/github/mssar-jax/mssar-jax/blob/main/notebooks/"
             "mssar_cifar10.ipynb")
PARAMS = ("steps", "recalibration", "data_dir", "workdir", "tiny")


def _read():
  import nbformat  # pylint: disable=import-outside-toplevel
  return nbformat.read(NOTEBOOK, as_version=4)


def _set_params(nb, **values):
  """Replaces the value of each ``name = ...  #@param`` line (a form field) by repr(value)."""
  for name, value in values.items():
    pattern = re.compile(rf"^({name} = ).*?(\s+#@param.*)$", re.MULTILINE)
    hits = [c for c in nb.cells if c.cell_type == "code" and pattern.search(c.source)]
    assert len(hits) == 1, f"form field {name!r} found in {len(hits)} cells"
    hits[0].source = pattern.sub(lambda m: f"{m[1]}{value!r}{m[2]}", hits[0].source, count=1)


def test_notebook_is_committed_without_outputs():
  import nbformat  # pylint: disable=import-outside-toplevel
  nb = _read()
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)
  assert COLAB_URL in nb.cells[0].source                          # the Open in Colab badge
  install = code[0].source                                        # the first cell installs
  assert 'find_spec("mssar_jax") is None' in install
  assert "git+{REPOSITORY}" in install and "mssar-jax/mssar-jax" in install
  assert 'os.environ.get("MSSAR_INSTALL_FROM"' in install
  assert not [c for c in code[1:] if "os.environ.get(\"MSSAR" in c.source]  # no env settings
  for name in PARAMS:
    assert re.search(rf"^{name} = .*#@param", "\n".join(c.source for c in code), re.MULTILINE)
  assert '"google.colab" in sys.modules' in "".join(c.source for c in code)  # %tensorboard
  _set_params(nb, steps=6)                                        # the test's edit still works


def _kernel_without_mssar(tmp_path) -> str:
  """A venv seeing this environment's packages, but not mssar_jax; returns its kernel name."""
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
  python = venv / "bin" / "python"
  purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                            "['purelib'])"], check=True, capture_output=True, text=True)
  here = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
  (pathlib.Path(purelib.stdout.strip()) / "_outer_env.pth").write_text("\n".join(here) + "\n")
  seen = subprocess.run([str(python), "-c", "import importlib.util as u; "
                         "print(u.find_spec('mssar_jax'), u.find_spec('ipykernel') is not None)"],
                        check=True, capture_output=True, text=True, cwd=tmp_path).stdout.split()
  assert seen == ["None", "True"], f"the kernel's Python sees mssar_jax or lacks ipykernel: {seen}"
  kernels = tmp_path / "jupyter" / "kernels" / "mssar-fresh"
  kernels.mkdir(parents=True)
  (kernels / "kernel.json").write_text(json.dumps({
      "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "fresh venv without mssar_jax", "language": "python"}))
  return "mssar-fresh"


@pytest.mark.slow
def test_notebook_runs_headless_on_a_fresh_kernel(tmp_path, monkeypatch):
  import nbformat  # pylint: disable=import-outside-toplevel
  from nbclient import NotebookClient  # pylint: disable=import-outside-toplevel
  data_dir = tiny.real_cifar10_dir()
  kernel = _kernel_without_mssar(tmp_path)
  here = tmp_path / "cwd"                                         # outside the checkout
  here.mkdir()
  workdir = tmp_path / "run"
  # setuptools' build and egg-info directories go to tmp: the checkout stays untouched.
  (tmp_path / "dist.cfg").write_text(f"[build]\nbuild_base = {tmp_path / 'build'}\n"
                                     f"[egg_info]\negg_base = {tmp_path}\n")
  for name, value in {"JUPYTER_PATH": tmp_path / "jupyter", "MSSAR_INSTALL_FROM": ROOT,
                      "PIP_NO_INDEX": "1", "DIST_EXTRA_CONFIG": tmp_path / "dist.cfg",
                      "TF_CPP_MIN_LOG_LEVEL": "2"}.items():
    monkeypatch.setenv(name, str(value))
  monkeypatch.delenv("PYTHONPATH", raising=False)
  # One CPU device in the kernel, as for a user (conftest simulates 8 for the other tests).
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 os.environ.get("XLA_FLAGS", "")).strip()
  monkeypatch.setenv("XLA_FLAGS", flags)

  nb = _read()
  _set_params(nb, steps=6, recalibration="ms_sar", data_dir=data_dir, workdir=str(workdir),
              tiny=True)
  NotebookClient(nb, timeout=240, kernel_name=kernel,
                 resources={"metadata": {"path": str(here)}}).execute()
  nbformat.write(nb, tmp_path / "executed.ipynb")                 # to read when this fails

  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert f"mssar-jax installed from {ROOT}" in text                # the first cell installed it
  assert f"mssar_jax {tmp_path / 'venv'}/lib/" in text            # ... into the fresh venv
  assert "6 steps, ms_sar, tiny=True" in text and "done: step 6/6" in text
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) == 2                                         # the curves and the score maps
  result = next(o["data"]["text/plain"] for o in outputs
                if "eval/accuracy" in o.get("data", {}).get("text/plain", ""))
  assert "'eval/num_examples': 200" in result
  assert (workdir / "curves.png").is_file()
  assert (workdir / "score_maps_6.png").is_file()
  assert (workdir / "checkpoints" / "6").is_dir()
  assert not (here / "runs").exists()                            # the workdir field was used
