"""Progress for long work on stderr: a tqdm bar on a terminal, plain lines in a log.

A bar redraws itself with carriage returns; written to a file (a job's log, `... > log 2>&1`)
every redraw stays in it (tens of KB of `\\r` lines per run). So when stderr is not a terminal,
`progress` writes one plain line per `LOG_INTERVAL_S` seconds of a long loop instead, and a last
line when a loop that wrote one ends; a loop shorter than that writes nothing. Nothing at all
when AVG_JAX_NO_PROGRESS is set.
"""

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any, Generic, Protocol, TextIO, TypeVar

import tqdm

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

LOG_INTERVAL_S = 30.0
_clock = time.monotonic  # seconds; tests replace it


class ProgressBar(Protocol[T_co]):
  """What `progress` returns: a tqdm bar or a `LogLines`."""

  def __iter__(self) -> Iterator[T_co]: ...
  def update(self, n: int = 1) -> Any: ...
  def set_postfix(self, **values: Any) -> Any: ...
  def close(self) -> None: ...


def progress(
  iterable: Iterable[T], *, total: int | None = None, desc: str = "", unit: str = "it"
) -> ProgressBar[T]:
  """Wraps `iterable` in a progress bar on stderr (plain lines when stderr is not a terminal).

  The result iterates like `iterable` and has tqdm's `update(n)`, `set_postfix(**values)` and
  `close()`."""
  disable = bool(os.environ.get("AVG_JAX_NO_PROGRESS"))
  stream = sys.stderr
  if not disable and not _is_terminal(stream):
    return LogLines(iterable, total=total, desc=desc, unit=unit, file=stream)
  return tqdm.tqdm(
    iterable,
    total=total,
    desc=desc,
    unit=unit,
    file=stream,
    disable=disable,
    dynamic_ncols=True,
    leave=False,
  )


def _is_terminal(stream) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):  # no isatty, or a closed stream
    return False


class LogLines(Generic[T]):
  """tqdm's iterate / update / set_postfix / close for a log file: at most one line per
  `interval_s` seconds of `clock`, each ending in a newline, and a closing line if any was
  written (so a log shows that the work it reported on ended, and in how long)."""

  def __init__(
    self,
    iterable: Iterable[T] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    file: TextIO | None = None,
    interval_s: float = LOG_INTERVAL_S,
    clock: Callable[[], float] | None = None,
  ):
    if total is None and isinstance(iterable, Sized):
      total = len(iterable)
    self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
    self.file, self.interval_s, self.clock = file, float(interval_s), clock or _clock
    self.n, self._postfix = 0, ""
    self._start = self._last = self.clock()
    self._wrote: tuple[int, str] | None = None  # (count, postfix) of the last line written
    self._closed = False

  def __iter__(self) -> Iterator[T]:
    try:
      if self.iterable is None:
        raise TypeError("LogLines: made without an iterable (use update())")
      for item in self.iterable:
        yield item
        self.update(1)
    finally:
      self.close()

  def update(self, n: int = 1) -> None:
    self.n += n
    now = self.clock()
    if now - self._last >= self.interval_s:
      self._write(now)

  def set_postfix(self, **values) -> None:
    self._postfix = ", ".join(f"{k}={v}" for k, v in values.items())

  def close(self) -> None:
    if self._closed:
      return
    self._closed = True
    # A closing line when a line was written and the count or postfix (the training loop's
    # last loss) changed since: a last line that already reads 2/2 needs no "done 2/2".
    if self._wrote is not None and self._wrote != (self.n, self._postfix):
      self._write(self.clock(), final=True)

  def _write(self, now: float, final: bool = False) -> None:
    done = f"{self.n}/{self.total}" if self.total else str(self.n)
    percent = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
    parts = [
      f"{self.desc + ': ' if self.desc else ''}{'done ' if final else ''}{done} "
      f"{self.unit}{percent} in {now - self._start:.0f} s"
    ]
    if self._postfix:
      parts.append(self._postfix)
    print(", ".join(parts), file=self.file or sys.stderr, flush=True)
    self._last, self._wrote = now, (self.n, self._postfix)
