"""One convention for user-facing errors.

A `UserError` carries a one-line message that names the offending file, key or value. The CLI
prints it without a traceback and exits with status 2 (`--debug` shows the traceback).
"""


class UserError(Exception):
  """A problem with the user's input (files, config, queries), not a bug in avg-jax."""

  def __init__(self, message: str):
    # Keep it to one line: the CLI prints exactly this.
    super().__init__(" ".join(str(message).split("\n")))


def require(condition: bool, message: str) -> None:
  """Raises `UserError(message)` unless `condition` holds."""
  if not condition:
    raise UserError(message)


class Preempted(Exception):
  """SIGTERM or a platform preemption notice: a checkpoint was saved; rerun to resume."""

  def __init__(self, step: int, directory: str):
    super().__init__(f"preempted at step {step}; checkpoint saved in {directory}; "
                     f"rerun the same command to resume")
    self.step = step
