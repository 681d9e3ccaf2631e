"""Experiment configs (``get_config(arg)`` per file); the repository's ``configs/`` points here,
so ``--config configs/cifar.py:...`` works from a clone and ``mssar_jax.configs.cifar`` from an
installed package (a notebook)."""
