r"""CIFAR-10/100 experiments: {ResNet-20/32/44/56/110, pre-act ResNet-164, DenseNet-40,
DenseNet-BC-100} x {none, se, ms_sar}, composed from comma-separated words:

    python train.py --config configs/cifar.py:cifar10,cifar_resnet20,ms_sar --workdir /tmp/r20
    python train.py --config configs/cifar.py:cifar100,cifar_densenet40,se --workdir ...
    python train.py --config configs/cifar.py:cifar10,cifar_resnet20,ms_sar,local --workdir ...

Recipes (lr divided by 10 at 50% and 75% of training in both):
  ResNets (He et al. 2016): SGD momentum 0.9, lr 0.1 at batch 128, weight decay 1e-4 on all
    weights, 164 epochs (64k steps). ResNet-110 warms up for 400 steps (the paper uses 0.01
    until training error < 80%, about 400 iterations; here a linear ramp).
  DenseNets (Huang et al. 2017): Nesterov momentum 0.9, lr 0.1 at batch 64, weight decay 1e-4,
    300 epochs.

``bf16`` computes in bfloat16 (params, BatchNorm statistics, logits and loss stay float32), as
TPUs and GPUs run fastest. ``local`` is for a CPU machine: batch 64 at lr 0.1, 1,500 steps (about 2 epochs; lr /10 at
50% and 75%), evals and checkpoints every 500 steps, and unscanned blocks (XLA:CPU runs the
backward pass of scanned blocks about 20x slower). A smoke run, not a result: on a 2-core
machine it takes about 0.5 s a step.
Any key can still be overridden, e.g. ``--config.batch_size=256 --config.num_epochs=10``.
"""

from mssar_jax import config_lib

_TRAIN_EXAMPLES = 50_000
_VOCABULARY = {
    "dataset": ("cifar10", "cifar100"),
    "model": ("cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56",
              "cifar_resnet110", "cifar_preact_resnet164", "cifar_densenet40",
              "cifar_densenet_bc100"),
    "recalibration": ("none", "se", "ms_sar"),
    "flags": ("local", "bf16"),
}
_DEFAULTS = {"dataset": "cifar10", "model": "cifar_resnet20", "recalibration": "ms_sar"}


def get_config(arg=None):
  args = config_lib.parse_args(arg, _VOCABULARY, _DEFAULTS)
  c = config_lib.base_config()
  config_lib.set_model(c, args["model"], args["recalibration"])
  c.dataset = args["dataset"]
  c.download = True                       # TFDS downloads CIFAR where it is missing
  c.train_split, c.eval_split = "train", "test"
  c.shuffle_buffer = _TRAIN_EXAMPLES      # a full shuffle every epoch
  c.cache = True
  if args["model"].startswith("cifar_densenet"):
    c.batch_size = c.reference_batch_size = 64
    c.num_epochs = 300
    c.nesterov = True
  else:
    c.batch_size = c.reference_batch_size = 128
    c.num_epochs = 164
    c.nesterov = False
    c.warmup_steps = 400 if args["model"] == "cifar_resnet110" else 0
  c.learning_rate = 0.1
  c.momentum = 0.9
  c.weight_decay = 1e-4
  c.weight_decay_on_bn_and_bias = True
  c.lr_schedule = "step"
  c.lr_boundaries = (0.5, 0.75)
  c.lr_decay_factor = 0.1
  steps_per_epoch = _TRAIN_EXAMPLES // c.batch_size
  c.eval_every_steps = 10 * steps_per_epoch
  c.checkpoint_every_steps = 5 * steps_per_epoch
  c.log_every_steps = 100
  c.half_precision = args["bf16"]
  if args["local"]:
    c.batch_size = c.reference_batch_size = 64
    c.learning_rate = 0.1
    c.warmup_steps = 0
    if "scan_blocks" in c.model_kwargs:
      c.model_kwargs.scan_blocks = False
    c.num_train_steps = 1500
    c.eval_every_steps = 500
    c.checkpoint_every_steps = 500
    c.log_every_steps = 50
  return c
