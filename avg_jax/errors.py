"""One convention for user-facing errors.

A `UserError` carries a one-line message that names the offending file, key or value, and
optionally one line per item when several things are wrong at once (every missing input path).
The CLI prints it without a traceback and exits with status 2 (`--debug` shows the traceback).
"""

from collections.abc import Sequence


def _one_line(text) -> str:
  return " ".join(str(text).split("\n"))


class UserError(Exception):
  """A problem with the user's input (files, config, queries), not a bug in avg-jax."""

  def __init__(self, message: str, items: Sequence[str] = ()):
    # One line, then one indented line per item: the CLI prints exactly this.
    self.items = tuple(_one_line(item) for item in items)
    super().__init__("\n  ".join((_one_line(message),) + self.items))


def require(condition: bool, message: str) -> None:
  """Raises `UserError(message)` unless `condition` holds."""
  if not condition:
    raise UserError(message)


class Preempted(Exception):
  """SIGTERM or a platform preemption notice: a checkpoint was saved; rerun to resume."""

  def __init__(self, step: int, directory: str):
    super().__init__(
      f"preempted at step {step}; checkpoint saved in {directory}; rerun the same command to resume"
    )
    self.step = step
