"""``python train.py --config ... --workdir ...``: the same as ``mssar-train``
(``mssar_jax/cli/train.py``)."""

from mssar_jax.cli import launch

if __name__ == "__main__":
  launch.train()
