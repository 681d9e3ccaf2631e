r"""ImageNet (ILSVRC-2012) experiments: {resnet50, resnet101, densenet121} x {none, se, ms_sar}
with a step (default) or cosine schedule:

    python train.py --config configs/imagenet.py:resnet50,ms_sar --workdir gs://.../r50_mssar
    python train.py --config configs/imagenet.py:densenet121,se,cosine --workdir ...

Recipe (Goyal et al. 2017 / SENet): SGD momentum 0.9, lr 0.1 per 256 images (scaled
linearly with the batch), batch 256, weight decay 1e-4 on all weights, 90 epochs, 5 warmup
epochs, ResNets start with the last BatchNorm scale of each block at zero; ``step`` divides the lr by 10 at epochs 30, 60 and 80, ``cosine`` decays to 0.
Evaluation on the 50,000 validation images (centre crop 224 of 256): top-1 and top-5.
Compute in bfloat16 (params, BatchNorm statistics, logits and loss in float32), as TPUs and GPUs
run fastest; ``local`` computes in float32.
ImageNet must be prepared for TFDS by hand (see the error message or the README).

``local`` is a CPU smoke run: 112x112 crops, batch 32, 20 steps, unscanned blocks, float32.
"""

from mssar_jax import config_lib

_TRAIN_EXAMPLES = 1_281_167
_VOCABULARY = {
    "model": ("resnet50", "resnet101", "densenet121"),
    "recalibration": ("none", "se", "ms_sar"),
    "lr_schedule": ("step", "cosine"),
    "flags": ("local",),
}
_DEFAULTS = {"model": "resnet50", "recalibration": "ms_sar", "lr_schedule": "step"}


def get_config(arg=None):
  args = config_lib.parse_args(arg, _VOCABULARY, _DEFAULTS)
  c = config_lib.base_config()
  config_lib.set_model(c, args["model"], args["recalibration"])
  c.dataset = "imagenet2012"
  c.train_split, c.eval_split = "train", "validation"
  c.image_size = 224
  c.shuffle_buffer = 16 * 1024
  c.shuffle_files = True
  c.cache = False
  c.batch_size = c.reference_batch_size = 256
  c.learning_rate = 0.1
  c.num_epochs = 90
  c.warmup_epochs = 5.0
  c.lr_schedule = args["lr_schedule"]
  c.lr_boundaries = tuple((e - c.warmup_epochs) / (c.num_epochs - c.warmup_epochs)
                          for e in (30, 60, 80))
  c.lr_decay_factor = 0.1
  c.momentum = 0.9
  c.nesterov = False
  c.weight_decay = 1e-4
  c.weight_decay_on_bn_and_bias = True
  c.label_smoothing = 0.0
  c.half_precision = True
  if "zero_init_residual" in c.model_kwargs:  # Goyal et al.: last BN scale of each block = 0
    c.model_kwargs.zero_init_residual = True
  steps_per_epoch = _TRAIN_EXAMPLES // c.batch_size
  c.eval_every_steps = 5 * steps_per_epoch
  c.checkpoint_every_steps = steps_per_epoch
  c.log_every_steps = 100
  if args["local"]:
    c.half_precision = False
    c.image_size = 112
    if "scan_blocks" in c.model_kwargs:
      c.model_kwargs.scan_blocks = False
    c.batch_size = 32
    c.num_train_steps = 20
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 10
    c.log_every_steps = 5
    c.shuffle_buffer = 1024
  return c
