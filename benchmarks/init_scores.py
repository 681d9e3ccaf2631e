r"""How much an untrained MS-SAR's score varies, by position and by channel, per context_init.

    python benchmarks/init_scores.py --data_dir ../shared/data/tfds

Initialises ``--model`` + ms_sar once per ``context_init`` (same seed), runs ``--num_images``
CIFAR-10 test images through it (eval mode) and prints, averaged over the recalibration
modules and images: the standard deviation of the score over positions (0 for SE) and the
standard deviation over channels of its spatial mean. With ``context_init='zeros'`` the
module is SE at this point, so the second line is SE's.
"""

from __future__ import annotations

from absl import app
from absl import flags
import jax
import numpy as np

from mssar_jax import models

flags.DEFINE_string("data_dir", None, "TFDS data directory holding cifar10.", required=True)
flags.DEFINE_string("model", "cifar_resnet20", "A CIFAR model name.")
flags.DEFINE_integer("num_images", 128, "Test images (the first ones of the split).")
flags.DEFINE_integer("seed", 0, "Initialisation seed.")
FLAGS = flags.FLAGS


def score_spread(model, images, seed: int) -> tuple[int, float, float]:
  """(modules, mean std over positions, mean std over channels) of the sown scores."""
  variables = model.init(jax.random.key(seed), images[:2], train=False)
  _, state = model.apply(variables, images, train=False, mutable=["intermediates"])
  scores = [np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(
      state["intermediates"]) if "score" in jax.tree_util.keystr(path)]
  spatial = [s.std(axis=(1, 2)).mean() for s in scores]
  channel = [s.mean(axis=(1, 2)).std(axis=-1).mean() for s in scores]
  return len(scores), float(np.mean(spatial)), float(np.mean(channel))


def main(argv):
  del argv
  import tensorflow_datasets as tfds  # only this tool's data, not the model code
  test = tfds.load("cifar10", split=f"test[:{FLAGS.num_images}]", data_dir=FLAGS.data_dir,
                   batch_size=-1, download=False)
  images = np.asarray(test["image"], np.float32) / 255.0
  images = (images - images.mean((0, 1, 2))) / images.std((0, 1, 2))
  for init in ("lecun_normal", "zeros"):
    model = models.get_model(FLAGS.model, num_classes=10, recalibration="ms_sar",
                             context_init=init)
    count, spatial, channel = score_spread(model, images, FLAGS.seed)
    print(f"{FLAGS.model} ms_sar context_init={init}: {count} modules, score std over "
          f"positions {spatial:.3f}, over channels {channel:.3f}")


if __name__ == "__main__":
  app.run(main)
