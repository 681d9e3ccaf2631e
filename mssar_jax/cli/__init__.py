"""The user commands, as console scripts and ``python -m`` modules (absl flags):

    mssar-train      python -m mssar_jax.cli.train       train and evaluate a config
    mssar-visualize  python -m mssar_jax.cli.visualize   score maps of a trained run
    mssar-plot       python -m mssar_jax.cli.plot        training curves of runs
    mssar-summary    python -m mssar_jax.cli.summary     parameters and FLOPs per model
"""
