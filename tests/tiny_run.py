"""Runs the tiny config on mock CIFAR-10 in a fresh process (for tests that need a real signal,
a kill -9, another device count or a second process).

    python tests/tiny_run.py WORKDIR --devices 8 [--overrides JSON] [--step_sleep S]
        [--process_id I --num_processes P --coordinator HOST:PORT]

Mock CIFAR-10 unless the overrides set ``data_dir`` (then that TFDS copy). WORKDIR may be
gs:// (the caller sets the storage environment). Writes the result of ``train_and_evaluate``
to WORKDIR/result.json (process 0; result_<i>.json for process i > 0). With
``--step_sleep`` every train batch is delayed by S seconds so a test can signal mid-run.
"""

import argparse
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("workdir")
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--overrides", default="{}")
  parser.add_argument("--step_sleep", type=float, default=0.0)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--coordinator", default="")
  args = parser.parse_args()

  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  sys.path.insert(0, str(ROOT))
  # JAX_DISABLE_MOST_OPTIMIZATIONS comes from the parent's environment (conftest), so this
  # process runs the same programs as the in-process tests.
  import jax  # pylint: disable=import-outside-toplevel
  if args.num_processes > 1:
    jax.distributed.initialize(args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from etils import epath  # pylint: disable=import-outside-toplevel
  from mssar_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from mssar_jax.train import loop  # pylint: disable=import-outside-toplevel
  from tests import tiny  # pylint: disable=import-outside-toplevel

  if args.step_sleep:
    original = data_lib.TrainData.iterate

    def slow(self, start_step=0):
      for batch in original(self, start_step):
        time.sleep(args.step_sleep)
        yield batch
    data_lib.TrainData.iterate = slow

  overrides = json.loads(args.overrides)
  config = tiny.tiny_cifar_config()
  for key, value in overrides.items():
    target = config
    *path, last = key.split(".")
    for part in path:
      target = target[part]
    target[last] = tuple(value) if isinstance(value, list) else value
  if config.data_dir:  # real data
    result = loop.train_and_evaluate(config, args.workdir)
  else:
    with tfds.testing.mock_data(num_examples=tiny.MOCK_EXAMPLES,
                                policy=tfds.testing.MockPolicy.USE_CODE):
      result = loop.train_and_evaluate(config, args.workdir)
  # result.json from process 0, result_<i>.json from the others (a gs:// workdir too).
  name = "result.json" if jax.process_index() == 0 else f"result_{jax.process_index()}.json"
  (epath.Path(args.workdir) / name).write_text(json.dumps(result))


if __name__ == "__main__":
  main()
