"""``trained.load`` and ``mssar-visualize`` on tiny trained runs (mock CIFAR-10)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from mssar_jax.cli import visualize
from mssar_jax.configs import cifar
from mssar_jax.storage import checkpoints
from mssar_jax.storage import metrics as metrics_lib
from mssar_jax.train import optim, state as state_lib, trained
from mssar_jax.errors import ConfigError
from mssar_jax.models import get_model

N = 40  # mock examples per split


def _tiny_config(recalibration):
  c = cifar.get_config(f"cifar10,cifar_resnet20,{recalibration},local")
  c.model_kwargs.depth, c.model_kwargs.width = 8, 4
  c.data_dir = ""
  c.batch_size, c.eval_batch_size = 16, 40
  c.num_train_steps, c.log_every_steps, c.eval_every_steps = 2, 1, 0
  c.checkpoint_every_steps, c.keep_checkpoints, c.shuffle_buffer = 1, 2, 40
  c.async_checkpointing = False
  return c


def _fill(abstract, seed):
  """A state of the abstract's structure: random params, unit BN variances, zero optimiser
  state (initialising for real costs seconds per model on a busy 2-core machine)."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = jax.tree_util.keystr(path)
    if "params" in name and "opt_state" not in name:
      return jnp.asarray(rng.normal(scale=0.3, size=x.shape), x.dtype)
    if name.endswith("['var']"):
      return jnp.ones(x.shape, x.dtype)
    return jnp.zeros(x.shape, x.dtype)
  state = jax.tree_util.tree_map_with_path(leaf, abstract)
  return state.replace(step=jnp.asarray(seed, jnp.int32))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Workdirs of tiny depth-8, width-4 ms_sar and se runs as the trainer leaves them
  (config.json, checkpoints 1 and 2 with their meta), holding freshly initialised states
  (different seeds per step): training is left to the notebook test, which runs the whole
  train -> plot -> visualize path on real data."""
  out = {}
  for recalibration in ("ms_sar", "se"):
    c = _tiny_config(recalibration)
    workdir = str(tmp_path_factory.mktemp(recalibration))
    model = state_lib.create_model(c, 10)
    tx = optim.make_optimizer(c, optim.make_schedule(c, 2, 2))
    ckpt = checkpoints.Checkpointer(workdir, keep=2, async_save=False)
    abstract = jax.eval_shape(lambda: state_lib.init_state(jax.random.key(0), model, tx, 32))
    for step in (1, 2):
      ckpt.save(step, _fill(abstract, step), state_lib.checkpoint_meta(c, 32))
    ckpt.close()
    metrics_lib.write_config(workdir, c)
    out[recalibration] = workdir
  return out


def _mock():
  return tfds.testing.mock_data(num_examples=N, policy=tfds.testing.MockPolicy.USE_CODE)


def test_load_restores_the_checkpoint(runs):
  run = trained.load(runs["ms_sar"])
  assert run.step == 2 and run.num_classes == 10 and run.image_size == 32
  config, model, variables = run                     # unpacks like a tuple
  assert config.model_kwargs.depth == 8 and config.recalibration_kwargs.scales == (2, 4, 8)
  assert set(variables) == {"params", "batch_stats"}
  logits = model.apply(variables, jnp.zeros((2, 32, 32, 3)), train=False)
  assert logits.shape == (2, 10) and np.all(np.isfinite(logits))
  first = trained.load(runs["ms_sar"], step=1)
  kernel = lambda v: v["params"]["head"]["kernel"]
  assert not np.allclose(kernel(first.variables), kernel(variables))  # a different step
  with pytest.raises(ConfigError, match="no checkpoint 7 .* available: 1, 2"):
    trained.load(runs["ms_sar"], step=7)
  with pytest.raises(ConfigError, match="config.json not found"):
    trained.load(os.path.dirname(runs["ms_sar"]))


def test_collect_maps_per_stage_and_scale(runs):
  run = trained.load(runs["ms_sar"])
  images = jnp.asarray(np.random.default_rng(0).normal(size=(3, 32, 32, 3)), jnp.float32)
  logits, blocks = visualize.collect_maps(run.model, run.variables, images)
  assert logits.shape == (3, 10)
  assert [b["block"] for b in blocks] == ["stage1_block1", "stage2_block1", "stage3_block1"]
  assert [b["size"] for b in blocks] == [(32, 32), (16, 16), (8, 8)]
  for b in blocks:
    assert list(b["scales"]) == [2, 4, 8]
    assert b["score"].shape[0] == 3 and 0 < b["score"].min() and b["score"].max() < 1
    h = b["size"][0]
    assert b["score"].shape[1:3] == (h // 2, h // 2)      # the gcd(scales) = 2 cell grid
    assert b["scales"][8].shape[1:3] == (h // 8, h // 8)
  se = trained.load(runs["se"])
  assert se.step == 2
  _, flat = visualize.collect_maps(se.model, se.variables, images)
  assert [b["score"].shape[1:3] for b in flat] == [(1, 1)] * 3 and not flat[0]["scales"]


def test_scanned_blocks_are_split_and_stages_named():
  model = get_model("cifar_resnet20", num_classes=10, recalibration="ms_sar", width=4,
                    scan_blocks=True)
  x = jnp.zeros((2, 32, 32, 3))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  variables = jax.tree.map(lambda s: jnp.full(s.shape, 0.01, s.dtype), shapes)  # fast
  _, blocks = visualize.collect_maps(model, variables, x)
  assert [b["block"] for b in blocks] == [
      f"stage{s}_{n}" for s in (1, 2, 3) for n in ("block1", "blocks_0", "blocks_1")]
  assert all(b["score"].shape[0] == 2 for b in blocks)
  assert [b["block"] for b in visualize.select_blocks(blocks, "last")] == [
      "stage1_blocks_1", "stage2_blocks_1", "stage3_blocks_1"]
  assert len(visualize.select_blocks(blocks, "first")) == 3
  assert visualize.stage_of("block3_layer12") == "block3"      # DenseNet layers
  assert visualize.stage_of("stage4_blocks_22") == "stage4"


def test_render_test_images_and_the_command_on_files(runs, tmp_path):
  out = str(tmp_path / "ms_sar.png")
  with _mock():
    assert visualize.render(runs["ms_sar"], num_images=2, out=out) == out
  width, height = Image.open(out).size
  assert width > height > 500            # 8 columns, 2 images x 3 stages = 6 rows

  picture = tmp_path / "photo.png"
  Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 64, 3), np.uint8)).save(picture)
  done = subprocess.run([sys.executable, "-m", "mssar_jax.cli.visualize", "--workdir",
                         runs["se"], "--image", str(picture), "--channels", "2",
                         "--data_dir", str(tmp_path / "no_data")],
                        capture_output=True, text=True, check=False)
  default = os.path.join(runs["se"], "score_maps_2.png")
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.strip() == default and os.path.isfile(default)
  assert visualize.load_image_file(str(picture), 32, "cifar10").shape == (32, 32, 3)

  with pytest.raises(ConfigError, match="config.json not found"):
    visualize.render(str(tmp_path / "missing"))
