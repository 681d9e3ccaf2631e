"""The one exception type for bad user input.

Every message is a single line that names the problem and the fix, and is raised before
any XLA compilation (at construction time, or while tracing shapes with ``jax.eval_shape``).
"""


class ConfigError(ValueError):
  """A user-facing configuration error with a one-line message naming the fix."""
