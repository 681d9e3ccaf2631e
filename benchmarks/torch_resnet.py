"""PyTorch reference for the benchmark: the same CIFAR ResNet train step, eager, on CPU.

Benchmark-only: it runs in a separate environment with torch (e.g. ``torch==2.13.0``); the
mssar_jax package never imports torch. ``python benchmarks/bench.py --torch-python PATH`` starts
this script as a subprocess and alternates timing rounds with the JAX step in the same run.

The network matches ``mssar_jax.models.get_model('cifar_resnet{6n+2}', num_classes=10)``:
3x3 conv (16) -> BN -> ReLU, three stages of n basic blocks (16, 32, 64 filters, conv3x3 -
BN - ReLU - conv3x3 - BN + option-A shortcut (stride-2 subsampling, zero-padded channels),
ReLU), global average pooling, a linear layer. Convs have no bias and He (fan-out) init; BN
momentum 0.1 (= flax 0.9), eps 1e-5. The step: cross-entropy, backward, SGD momentum 0.9 with
coupled weight decay 1e-4 on every parameter (PyTorch's SGD, the trainer's recipe), lr 0.1.

Protocol (stdin/stdout, one line each): after start-up it prints ``ready {json}`` (threads,
torch version, parameter count, layout); then each line ``N`` on stdin runs N train steps (or
``eval N``: N inference forwards) and prints the seconds per step. EOF on stdin ends it.

    python benchmarks/torch_resnet.py --depth 20 --batch-size 128 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
  def __init__(self, in_planes: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes, eps=1e-5, momentum=0.1)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes, eps=1e-5, momentum=0.1)
    self.stride, self.extra = stride, planes - in_planes

  def shortcut(self, x):
    if self.stride > 1:
      x = x[:, :, ::self.stride, ::self.stride]
    if self.extra > 0:
      x = F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
    return x

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + self.shortcut(x))


class CifarResNet(nn.Module):
  def __init__(self, depth: int = 20, num_classes: int = 10, width: int = 16):
    super().__init__()
    n = (depth - 2) // 6
    self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    self.stem_bn = nn.BatchNorm2d(width, eps=1e-5, momentum=0.1)
    blocks, planes = [], width
    for stage in range(3):
      out = width * 2 ** stage
      for i in range(n):
        blocks.append(BasicBlock(planes, out, 2 if (stage > 0 and i == 0) else 1))
        planes = out
    self.blocks = nn.Sequential(*blocks)
    self.head = nn.Linear(planes, num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

  def forward(self, x):
    x = F.relu(self.stem_bn(self.stem(x)))
    x = self.blocks(x)
    return self.head(x.mean(dim=(2, 3)))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--depth", type=int, default=20)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
  parser.add_argument("--channels-last", action="store_true", help="NHWC memory format")
  parser.add_argument("--once", type=int, default=0, help="run N steps, print, exit (no protocol)")
  args = parser.parse_args(argv)
  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  model = CifarResNet(args.depth)
  fmt = torch.channels_last if args.channels_last else torch.contiguous_format
  model = model.to(memory_format=fmt)
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
  x = torch.randn(args.batch_size, 3, 32, 32).contiguous(memory_format=fmt)
  y = torch.randint(0, 10, (args.batch_size,))

  def train(n: int) -> float:
    model.train()
    start = time.perf_counter()
    for _ in range(n):
      opt.zero_grad(set_to_none=True)
      loss = F.cross_entropy(model(x), y)
      loss.backward()
      opt.step()
    float(loss.detach())
    return (time.perf_counter() - start) / n

  def evaluate(n: int) -> float:
    model.eval()
    start = time.perf_counter()
    with torch.inference_mode():
      for _ in range(n):
        out = model(x)
    float(out[0, 0])
    return (time.perf_counter() - start) / n

  train(2)
  evaluate(1)
  if args.once:
    print(f"{args.batch_size / train(args.once):.1f} img/s")
    return 0
  params = sum(p.numel() for p in model.parameters())
  info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "params": params,
          "depth": args.depth, "batch_size": args.batch_size,
          "memory_format": "channels_last" if args.channels_last else "NCHW"}
  print("ready " + json.dumps(info), flush=True)
  for line in sys.stdin:
    words = line.split()
    if not words:
      continue
    if words[0] == "eval":
      print(evaluate(int(words[1])), flush=True)
    else:
      print(train(int(words[0])), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
