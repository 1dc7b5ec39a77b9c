"""Reading dataset files within bounds: regular files only (a FIFO never blocks), a size
limit checked before anything is read, and lines decoded one at a time, so a file that is too
large, one endless line or bytes that are not UTF-8 stop with one message naming the file."""

from __future__ import annotations

import os
import re
import stat

from cold_fusion_tf.errors import UserError
from cold_fusion_tf.store import untrusted

MAX_TEXT_CHARS = 100_000
"""The longest text (or text pair) of one example, in characters."""
DEFAULT_MAX_FILE_MB = 1024
"""The largest dataset file read, in MiB, unless ``config.data.max_file_mb`` says otherwise
(every split is read into memory whole before training)."""
MAX_LINE_BYTES = 16 << 20
"""The longest line of a dataset file: a record's texts have at most ``MAX_TEXT_CHARS``
characters each (up to 12 bytes each as JSON escapes), with room for other fields."""
# What a dataset file that is not UTF-8 text starts with, when it is known.
_NOT_TEXT = ((b"\x1f\x8b", "a gzip file"), (b"PK\x03\x04", "a zip file"),
             (b"BZh", "a bzip2 file"), (b"\xfd7zXZ", "an xz file"),
             (b"\x28\xb5\x2f\xfd", "a zstd file"), (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))


def open_data(file: str, max_bytes: int, why: str = ""):
  """A regular file (or a link to one) of at most ``max_bytes``, opened for binary reading.
  Opened without blocking and checked on the open file, so a FIFO never hangs the reader."""
  try:
    fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
  except OSError as e:
    if os.path.islink(file) and not os.path.exists(file):
      raise UserError(f"{file}: a symbolic link to {untrusted.printable(os.readlink(file), 200)}"
                      ", which does not exist; link the file itself or copy it here.") from None
    raise UserError(f"{file}: cannot be read ({e.strerror}).") from None
  try:
    info = os.fstat(fd)
    if stat.S_ISDIR(info.st_mode):
      raise UserError(f"{file}: is a folder; it should be a file.")
    if not stat.S_ISREG(info.st_mode):
      raise UserError(f"{file}: not a regular file (a device, pipe or socket); copy the data "
                      "into a file.")
    if info.st_size > max_bytes:
      raise UserError(f"{file}: {_size(info.st_size)}, larger than the {_size(max_bytes)} a "
                      f"dataset file may have here; {why}.")
    return os.fdopen(fd, "rb")
  except BaseException:
    os.close(fd)
    raise


def _size(n: int) -> str:
  """``n`` bytes for a message: ``5.0 GiB``, ``16.0 MiB`` or ``300 bytes``."""
  for unit, shift in (("GiB", 30), ("MiB", 20)):
    if n >= 1 << shift:
      return f"{n / (1 << shift):.1f} {unit}"
  return f"{n} bytes"


def text_lines(f, file: str, max_bytes: int):
  """(line number, decoded line with its line break) per line of an open UTF-8 file; lines
  end at LF, CR LF or CR as in Python's universal newlines (a U+2028 inside a JSON string is
  text, not a line break); a UTF-8 BOM is dropped. A line longer than ``MAX_LINE_BYTES``,
  bytes that are not UTF-8 and a file that outgrows ``max_bytes`` stop with a UserError."""
  number, total = 0, 0
  while True:
    raw = f.readline(MAX_LINE_BYTES + 1)
    if not raw:
      return
    total += len(raw)
    if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
      raise UserError(f"{file}:{number + 1}: a line of more than {_size(MAX_LINE_BYTES)}; a "
                      f"record holds at most {MAX_TEXT_CHARS} characters per text: is the file "
                      "one record per line?")
    if total > max_bytes:
      raise UserError(f"{file}: grew beyond {_size(max_bytes)} while it was read.")
    for part in re.split(rb"(?<=\r)(?!\n)", raw) if b"\r" in raw[:-2] else (raw,):
      if not part:  # after a CR that ends the file
        continue
      number += 1
      try:
        text = part.decode("utf-8")
      except UnicodeDecodeError as e:
        kind = next((k for magic, k in _NOT_TEXT if part.startswith(magic)), "") * (number == 1)
        fix = ("re-encode the file as UTF-8" if not kind else f"it is {kind}: decompress it"
               if kind.endswith("file") else f"it is {kind} text: re-encode the file as UTF-8")
        raise UserError(f"{file}:{number}: not UTF-8 text (byte 0x{part[e.start]:02x}); "
                        f"{fix}.") from None
      yield number, text.removeprefix("\ufeff") if number == 1 else text
