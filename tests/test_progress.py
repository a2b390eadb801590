"""Progress output: a bar on a terminal, a few plain lines in a log file, nothing when asked."""

import io

import tqdm

from avg_jax import progress as progress_lib


class _Clock:
  """A clock the test moves by hand: no test here depends on how fast the machine is."""

  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_a_log_file_gets_plain_lines_at_intervals_never_carriage_returns(monkeypatch):
  # A bar written to `... > log 2>&1` left every redraw in the log (56 KB of \r lines a run).
  clock = _Clock()
  log = io.StringIO()
  monkeypatch.setattr(progress_lib, "_clock", clock, raising=False)
  monkeypatch.setattr("sys.stderr", log)
  monkeypatch.delenv("AVG_JAX_NO_PROGRESS", raising=False)
  bar = progress_lib.progress(range(10), desc="train [avg]", unit="step")
  for step in bar:
    clock.now += 10.0  # 10 s a step: a line every third step (30 s)
    if step == 4:
      bar.set_postfix(loss="5.1751")
  text = log.getvalue()
  assert "\r" not in text and "\x1b" not in text
  assert text.splitlines() == [
    "train [avg]: 3/10 step (30%) in 30 s",
    "train [avg]: 6/10 step (60%) in 60 s, loss=5.1751",
    "train [avg]: 9/10 step (90%) in 90 s, loss=5.1751",
    "train [avg]: done 10/10 step (100%) in 100 s, loss=5.1751",
  ]


def test_no_closing_line_repeats_the_last_one(monkeypatch):
  clock = _Clock()
  log = io.StringIO()
  monkeypatch.setattr(progress_lib, "_clock", clock, raising=False)
  monkeypatch.setattr("sys.stderr", log)
  monkeypatch.delenv("AVG_JAX_NO_PROGRESS", raising=False)
  for _ in progress_lib.progress(range(2), desc="efficiency (AVG)", unit="N"):
    clock.now += 40.0  # every step past the interval: a line each, the last one at 2/2
  assert log.getvalue().splitlines() == [
    "efficiency (AVG): 1/2 N (50%) in 40 s",
    "efficiency (AVG): 2/2 N (100%) in 80 s",
  ]


def test_short_work_writes_nothing_to_a_log(monkeypatch):
  log = io.StringIO()
  monkeypatch.setattr(progress_lib, "_clock", _Clock())  # no time passes
  monkeypatch.setattr("sys.stderr", log)
  monkeypatch.delenv("AVG_JAX_NO_PROGRESS", raising=False)
  assert list(progress_lib.progress(iter(range(5)), total=5, desc="embed")) == list(range(5))
  bar = progress_lib.progress(range(3), desc="resumed")  # the training loop's calls
  bar.update(2)
  bar.set_postfix(loss="1.0")
  bar.close()
  assert log.getvalue() == ""


def test_a_terminal_gets_a_bar_and_no_progress_gets_nothing(monkeypatch):
  terminal = _Terminal()
  monkeypatch.setattr("sys.stderr", terminal)
  monkeypatch.delenv("AVG_JAX_NO_PROGRESS", raising=False)
  bar = progress_lib.progress(range(3), desc="tty")
  assert isinstance(bar, tqdm.tqdm) and list(bar) == [0, 1, 2]
  assert "tty" in terminal.getvalue()
  for stream in (io.StringIO(), _Terminal()):
    monkeypatch.setattr("sys.stderr", stream)
    monkeypatch.setattr(progress_lib, "_clock", _Clock())
    monkeypatch.setenv("AVG_JAX_NO_PROGRESS", "1")
    assert list(progress_lib.progress(range(3), desc="quiet")) == [0, 1, 2]
    assert stream.getvalue() == ""
