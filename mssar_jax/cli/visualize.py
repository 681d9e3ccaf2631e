r"""Recalibration score maps of a trained run, per stage and per scale, as one PNG grid.

    mssar-visualize --workdir runs/local                 # 4 test images
    mssar-visualize --workdir runs/local --image cat.png --out maps.png
    mssar-visualize --workdir runs/local --num_images 2 --first 10 --blocks all

One row per (image, stage) -- by default the last block of each stage (``--blocks first``,
``all``) -- and these columns, each drawn over the (grey) input image:

* ``input``: the image, its label and the model's prediction;
* ``score (mean)``: the final gate ``score`` in (0, 1), averaged over channels. MS-SAR gives a
  map per position; SE one value per channel (a flat map, drawn as one colour);
* ``scale s``: for MS-SAR, what scale s adds to the bottleneck before the excitation,
  ``Up_s(K_s * Pool_s(z))`` (sown as ``scale_{s}``), averaged over its C/r channels; signed,
  red above and blue below zero;
* ``ch c``: the score of the ``--channels`` channels that vary most (standard deviation over
  the shown images and positions, so for SE: over the images).

Each panel has its own colour range, written in its title as [min, max]: the maps are about
where the gate differs, and the mean over many channels moves within a narrow band.
Maps live on the recalibration's cell grid (MS-SAR's default 'pooled' evaluation computes the
score once per gcd(scales) x gcd(scales) cell); each cell is drawn over the pixels it covers.
Writes ``<workdir>/score_maps_<step>.png`` unless ``--out`` is given (either may be gs://);
never touches the checkpoints. The dataset is read only for test images (``--data_dir``
overrides the run's). Also ``python -m mssar_jax.cli.visualize``.
"""

from __future__ import annotations

import re
import sys
from typing import Any, Sequence

from absl import app
from absl import flags
from etils import epath
import flax
import jax
import jax.numpy as jnp
from matplotlib.figure import Figure
import numpy as np
from PIL import Image
import tensorflow as tf

from mssar_jax import datasets
from mssar_jax import config_lib
from mssar_jax import data
from mssar_jax.errors import ConfigError
from mssar_jax.storage import metrics as metrics_lib
from mssar_jax.train import step as step_lib
from mssar_jax.train import trained

_STAGE = re.compile(r"^((?:stage|block)\d+)")


# ---------------------------------------------------------------------------------------------
# Images.

def normalise(images: np.ndarray, dataset: str) -> np.ndarray:
  """uint8 / 0-255 images (N, H, W, 3) -> the network's normalised float32 input."""
  return np.asarray(step_lib.normalise(jnp.asarray(images), datasets.get(dataset)))


def load_image_file(path: str, size: int, dataset: str) -> np.ndarray:
  """An image file as (size, size, 3) uint8, prepared like the eval split.

  ImageNet: shorter side to size / 0.875, centre crop. Otherwise (CIFAR): centre square crop,
  resized to size x size.
  """
  try:
    with epath.Path(path).open("rb") as f:
      image = Image.open(f).convert("RGB")
  except (OSError, ValueError) as e:
    raise ConfigError(f"cannot read image {path!r} ({e}); pass a PNG or JPEG file.") from e
  w, h = image.size
  if dataset.startswith("imagenet"):
    scale = (size / 0.875) / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                         Image.BILINEAR)
  else:
    side = min(w, h)
    image = image.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side,
                        (h - side) // 2 + side)).resize((size, size), Image.BILINEAR)
  w, h = image.size
  left, top = (w - size) // 2, (h - size) // 2
  return np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)


def eval_images(config, num: int, first: int = 0, data_dir: str | None = None):
  """(uint8 images (N, S, S, 3), labels, class names) of the eval split, in file order."""
  data.hide_accelerators_from_tensorflow()
  config = config.copy_and_resolve_references()
  config.download = False  # test images from the data the run used, not a new download
  if data_dir is not None:
    config.data_dir = data_dir
  builder = data.get_builder(config)  # ConfigError naming the fix if absent
  size = config_lib.image_size(config)
  ds = builder.as_dataset(split=config.eval_split, shuffle_files=False).skip(first).take(num)
  images, labels = [], []
  for example in ds.as_numpy_iterator():
    image = example["image"]
    if image.shape[:2] != (size, size):
      image = tf.cast(tf.image.resize(image, [size, size]), tf.uint8).numpy()
    images.append(image)
    labels.append(int(example["label"]))
  if not images:
    raise ConfigError(f"no images in split {config.eval_split!r} from index {first}.")
  names = builder.info.features["label"].names
  return np.stack(images), labels, list(names)


# ---------------------------------------------------------------------------------------------
# Maps.

def _block_name(path: Sequence[str]) -> str:
  """'stage2_blocks_0/recalibration' -> 'stage2_blocks_0'; scan 'block' wrappers dropped."""
  parts = [p for p in path if p not in ("recalibration", "block")]
  return "/".join(parts) or "top"


def stage_of(block: str) -> str:
  """The stage label of a block path: 'stage2_blocks_1' -> 'stage2', 'block3_layer4' -> 'block3'."""
  match = _STAGE.match(block)
  return match.group(1) if match else block.split("/")[0].split("_")[0]


def collect_maps(model, variables, images: np.ndarray) -> tuple[np.ndarray, list[dict]]:
  """Runs the model in eval mode and gathers every recalibration module's maps.

  Returns (logits, blocks) with one dict per recalibration module, in network order:
  ``{'block', 'stage', 'size': (H, W) of the feature map, 'score': (N, gh, gw, C),
  'scales': {s: (N, gh_s, gw_s, C/r)}}``. Blocks stacked by ``nn.scan`` are split into one
  entry each (``<name>_<i>``).
  """
  def is_recalibration(module, method_name):
    return module.name == "recalibration" and method_name == "__call__"

  logits, state = model.apply(variables, images, train=False, mutable=["intermediates"],
                              capture_intermediates=is_recalibration)
  flat = flax.traverse_util.flatten_dict(jax.device_get(state["intermediates"]))
  grouped: dict[tuple, dict[str, Any]] = {}
  for key, value in flat.items():
    *module_path, leaf = key
    if leaf == "__call__":
      leaf = "output"
    value = value[0] if isinstance(value, tuple) else value
    grouped.setdefault(tuple(module_path), {})[leaf] = np.asarray(value, np.float32)
  n = images.shape[0]
  blocks = []
  for path, values in grouped.items():
    if "score" not in values:
      continue
    name = _block_name(path)
    score = values["score"]
    stacked = score.ndim == 5  # nn.scan: (count, N, gh, gw, C)
    count = score.shape[0] if stacked else 1
    for i in range(count):
      pick = (lambda a, i=i: a[i]) if stacked else (lambda a: a)
      out = pick(values["output"]) if "output" in values else None
      scales = {int(k.split("_", 1)[1]): pick(v) for k, v in values.items()
                if k.startswith("scale_")}
      blocks.append({
          "block": f"{name}_{i}" if stacked else name,
          "stage": stage_of(name),
          "size": tuple(out.shape[1:3]) if out is not None else tuple(pick(score).shape[1:3]),
          "score": pick(score).reshape((n,) + pick(score).shape[-3:]),
          "scales": dict(sorted(scales.items())),
      })
  return np.asarray(logits), blocks


def select_blocks(blocks: list[dict], which: str = "last") -> list[dict]:
  """One block per stage ('first' or 'last', in network order) or 'all'."""
  if which == "all":
    return list(blocks)
  if which not in ("first", "last"):
    raise ConfigError(f"--blocks {which!r}: use first, last or all.")
  chosen: dict[str, dict] = {}
  for b in blocks:
    if which == "last" or b["stage"] not in chosen:
      chosen[b["stage"]] = b
  return list(chosen.values())


def varying_channels(score: np.ndarray, k: int) -> list[int]:
  """The k channels of score (N, h, w, C) with the largest std over images and positions."""
  std = score.reshape(-1, score.shape[-1]).std(axis=0)
  return [int(c) for c in np.argsort(-std, kind="stable")[:k]]


def _extent(cells: tuple[int, int], size: tuple[int, int], image: int):
  """imshow extent placing a grid of cells over the feature map (edge cells may overhang)."""
  gh, gw = cells
  h, w = size
  cell_h, cell_w = -(-h // gh), -(-w // gw)
  return (-0.5, gw * cell_w * image / w - 0.5, gh * cell_h * image / h - 0.5, -0.5)


# ---------------------------------------------------------------------------------------------
# Drawing.

def draw(images: np.ndarray, titles: Sequence[str], blocks: list[dict], out: str, *,
         channels: int = 3, suptitle: str = "", dpi: int = 80) -> str:
  """Draws the grid (rows: image x block, columns: input, mean score, scales, channels)."""
  scales = sorted({s for b in blocks for s in b["scales"]})
  chans = [varying_channels(b["score"], channels) for b in blocks]
  ncols = 2 + len(scales) + max((len(c) for c in chans), default=0)
  nrows = len(images) * len(blocks)
  panel = 1.75
  fig = Figure(figsize=(panel * ncols, panel * nrows + 0.3), layout="constrained")
  axes = fig.subplots(nrows, ncols, squeeze=False)
  size = images.shape[1]
  grey = images.astype(np.float32).mean(-1) / 255.0

  def overlay(ax, grid, cells_of, block, cmap, signed, title):
    ax.imshow(grey[i], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    lo, hi = float(grid.min()), float(grid.max())
    if signed:
      bound = max(abs(lo), abs(hi), 1e-6)
      vmin, vmax = -bound, bound
    elif hi - lo < 1e-6:  # flat (SE): one mid-range colour
      vmin, vmax = lo - 0.5, hi + 0.5
    else:
      vmin, vmax = lo, hi
    ax.imshow(grid, cmap=cmap, vmin=vmin, vmax=vmax, alpha=0.6, interpolation="nearest",
              extent=_extent(cells_of, block["size"], size))
    ax.set_xlim(-0.5, size - 0.5)
    ax.set_ylim(size - 0.5, -0.5)
    ax.set_title(f"{title}\n[{lo:.2f}, {hi:.2f}]", fontsize=7)

  for i in range(len(images)):
    for j, block in enumerate(blocks):
      row = axes[i * len(blocks) + j]
      for ax in row:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.axis("off")
      ax = row[0]
      ax.axis("on")
      ax.imshow(images[i], interpolation="nearest")
      ax.set_title(titles[i], fontsize=7)
      h, w = block["size"]
      c = block["score"].shape[-1]
      ax.set_ylabel(f"{block['stage']}\n{block['block']}\n{h}x{w}x{c}", fontsize=7)
      score = block["score"][i]
      cells = score.shape[:2]
      flat = " (flat)" if cells == (1, 1) else ""
      overlay(row[1], score.mean(-1), cells, block, "viridis", False, f"score mean{flat}")
      for k, s in enumerate(scales):
        if s in block["scales"]:
          grid = block["scales"][s][i]
          overlay(row[2 + k], grid.mean(-1), grid.shape[:2], block, "RdBu_r", True,
                  f"scale {s} (mean of {grid.shape[-1]})")
      for k, ch in enumerate(chans[j]):
        overlay(row[2 + len(scales) + k], score[..., ch], cells, block, "viridis", False,
                f"ch {ch}{flat}")
  if suptitle:
    fig.suptitle(suptitle, fontsize=9)
  return metrics_lib.save_png(fig, out, dpi)


def render(workdir: str, *, step: int | None = None, images: Sequence[str] = (),
           num_images: int = 4, first: int = 0, blocks: str = "last", channels: int = 3,
           data_dir: str | None = None, out: str | None = None, dpi: int = 80) -> str:
  """Loads ``workdir`` and writes the score-map grid; returns the PNG's path."""
  run = trained.load(workdir, step)
  config = run.config
  if config.recalibration in (None, "none"):
    raise ConfigError(f"{workdir} was trained without recalibration ('none'): there are no "
                      "score maps; pick a run with se or ms_sar.")
  names: list[str] = []
  if images:
    pixels = np.stack([load_image_file(p, run.image_size, config.dataset) for p in images])
    titles = [epath.Path(p).name for p in images]
    labels = [None] * len(images)
    try:
      _, _, names = eval_images(config, 1, 0, data_dir)
    except ConfigError:
      names = []
  else:
    pixels, labels, names = eval_images(config, num_images, first, data_dir)
    titles = [f"#{first + i}" for i in range(len(pixels))]
  logits, found = collect_maps(run.model, run.variables,
                               jnp.asarray(normalise(pixels, config.dataset)))
  if not found:
    raise ConfigError(f"no recalibration maps found in {config.model} + {config.recalibration}.")
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  name = lambda c: names[c] if c is not None and c < len(names) else str(c)
  for i, label in enumerate(labels):
    pred = int(probs[i].argmax())
    truth = f" {name(label)}" if label is not None else ""
    titles[i] = f"{titles[i]}{truth}\npred {name(pred)} {probs[i, pred]:.2f}"
  chosen = select_blocks(found, blocks)
  out = out or str(epath.Path(workdir) / f"score_maps_{run.step}.png")
  kwargs = config.recalibration_kwargs.to_dict()
  detail = f" scales={tuple(kwargs['scales'])}" if "scales" in kwargs else ""
  suptitle = (f"{config.model} + {config.recalibration}{detail}, {config.dataset}, step "
              f"{run.step} ({epath.Path(workdir).name})")
  return draw(pixels, titles, chosen, out, channels=channels, suptitle=suptitle, dpi=dpi)


def define_flags() -> None:
  """The command's flags (defined only when it runs, so the module imports anywhere)."""
  flags.DEFINE_string("workdir", None, "A training run's --workdir.", required=True)
  flags.DEFINE_integer("step", None, "Checkpoint (default: the newest).")
  flags.DEFINE_multi_string("image", [], "An image file instead of test images.")
  flags.DEFINE_integer("num_images", 4, "Test images.")
  flags.DEFINE_integer("first", 0, "Index of the first test image.")
  flags.DEFINE_enum("blocks", "last", ["first", "last", "all"], "Which blocks of each stage.")
  flags.DEFINE_integer("channels", 3, "Most varying channels shown per block.")
  flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: the run's).")
  flags.DEFINE_string("out", None, "PNG path (default: <workdir>/score_maps_<step>.png).")
  flags.DEFINE_integer("dpi", 80, "Resolution of the PNG.")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    path = render(f.workdir, step=f.step, images=f.image, num_images=f.num_images,
                  first=f.first, blocks=f.blocks, channels=f.channels, data_dir=f.data_dir,
                  out=f.out, dpi=f.dpi)
  except ConfigError as e:
    sys.exit(f"visualize: {e}")
  print(path)


if __name__ == "__main__":
  define_flags()
  app.run(main)
