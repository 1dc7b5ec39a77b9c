"""Progress for people: status lines with a bar and an ETA, redrawn in place on a terminal and
written as complete lines in a log (CI, a file, a pipe).

Code that reports progress calls its ``log`` callable with a :class:`Status` (a ``str``, so any
``log`` accepts it). The programs' ``log`` is a :class:`Display`: on a terminal it redraws the
current status line in place; elsewhere it writes every line as it comes. Whether a ``log``
redraws is :func:`live`: code with frequent updates (the training loop, after every few
steps) sends those only to a live one, and otherwise a line every so often.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import Callable, TextIO

from cold_fusion_tf.training.common import duration_text


class Status(str):
  """A progress line; ``final`` marks the last one of its task (always written)."""

  final: bool

  def __new__(cls, text: str, final: bool = False) -> "Status":
    line = super().__new__(cls, text)
    line.final = final
    return line


def live(log: Callable[[str], None]) -> bool:
  """Whether ``log`` shows status lines in place (so frequent updates cost nothing)."""
  return bool(getattr(log, "live", False))


def bar(done: float, total: float, width: int = 20) -> str:
  """``[#######.............]  35%``."""
  fraction = min(max(done / total, 0.0), 1.0) if total > 0 else 1.0
  filled = int(round(fraction * width))
  return f"[{'#' * filled}{'.' * (width - filled)}] {fraction * 100:3.0f}%"


def eta(done: float, total: float, elapsed: float) -> str:
  """The time left at the rate so far (``?`` before anything is done)."""
  if done <= 0:
    return "?"
  return duration_text(elapsed * (total - done) / done)


class Tracker:
  """Progress over ``total`` units of long work (e.g. iterations): the bar, the time so far
  and the ETA at the rate so far, as a line that stays (:meth:`line`)."""

  def __init__(self, total: int, unit: str):
    self.total, self.unit = total, unit
    self.start = time.monotonic()

  def line(self, done: int, prefix: str = "") -> Status:
    elapsed = time.monotonic() - self.start
    return Status(f"{prefix}{bar(done, self.total)} {done}/{self.total} {self.unit} in "
                  f"{duration_text(elapsed)}, ETA {eta(done, self.total, elapsed)}", final=True)


class Display:
  """A ``log`` callable for programs (see the module docstring)."""

  def __init__(self, stream: TextIO | None = None, terminal: bool | None = None):
    self._stream = stream
    self._terminal = terminal
    self._open = False  # a status line is on screen, without its newline

  @property
  def stream(self) -> TextIO:
    return self._stream or sys.stdout

  @property
  def live(self) -> bool:
    if self._terminal is not None:
      return self._terminal
    isatty = getattr(self.stream, "isatty", None)
    return bool(isatty and isatty())

  def __call__(self, message: str) -> None:
    stream = self.stream
    if isinstance(message, Status) and self.live:
      width = max(shutil.get_terminal_size((100, 20)).columns - 1, 4)  # COLUMNS=1: still short
      text = message if len(message) <= width else message[:width - 3] + "..."
      stream.write("\r" + text + "\x1b[K" + ("\n" if message.final else ""))
      self._open = not message.final
    else:
      if self._open:
        stream.write("\r\x1b[K")
        self._open = False
      stream.write(f"{message}\n")
    stream.flush()
