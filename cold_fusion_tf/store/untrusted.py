"""Reading what others wrote: bounded, regular files only, JSON parsed defensively.

Everything a contributor (or anyone with write access to a store) can place in front of the
fuser goes through here first:

* :func:`read_regular`: a local file's bytes, refused unless it is a regular file (not a
  FIFO, device, directory or symbolic link) of at most ``max_bytes``, checked with ``fstat``
  on the opened descriptor before anything is read (a FIFO is opened without blocking);
* :func:`loads`: JSON with limits on nesting depth, integer digits and string sizes, and no
  ``NaN`` / ``Infinity`` tokens, so a crafted file becomes one :class:`UserError`, never a
  ``RecursionError``, ``ValueError`` or ``OverflowError``;
* :func:`printable`: an untrusted name or message made safe for a terminal.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import re
import stat

from cold_fusion_tf.errors import LimitError, UserError

MAX_DEPTH = 32
"""Deepest nesting of JSON arrays and objects accepted (store files need 4)."""
MAX_INT_DIGITS = 32
"""Most digits of a JSON integer (counts, offsets and sizes need fewer than 20)."""
MAX_FLOAT_CHARS = 64

# A JSON string, or an unterminated one up to the end: a match never fails once started, so
# one pass skips every string (a pattern that must find the closing quote retries from each
# later quote: quadratic time on a quote followed by many escaped quotes).
_STRING = re.compile(r'"(?:[^"\\]|\\.)*(?:"|\\?\Z)', re.S)
_BRACKETS = re.compile(r"[\[\]{}]")


def _parse_int(text: str) -> int:
  if len(text.lstrip("-")) > MAX_INT_DIGITS:
    raise ValueError(f"an integer of {len(text)} characters (at most {MAX_INT_DIGITS} digits)")
  return int(text)


def _parse_float(text: str) -> float:
  if len(text) > MAX_FLOAT_CHARS:
    raise ValueError(f"a number of {len(text)} characters")
  value = float(text)
  if value in (float("inf"), float("-inf")):
    raise ValueError(f"the number {text[:20]} is out of the float range")
  return value


def _refuse_constant(text: str):
  raise ValueError(f"{text} is not a JSON number")


def depth(text: str) -> int:
  """The deepest nesting of arrays and objects in JSON ``text`` (strings skipped)."""
  marks = _BRACKETS.findall(_STRING.sub('""', text))
  steps = (1 if m in "[{" else -1 for m in marks)
  return max(itertools.accumulate(steps, initial=0))


def loads(data: bytes, where: str, max_depth: int = MAX_DEPTH):
  """Parses untrusted JSON bytes: any value, or a UserError that says what is wrong."""
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise UserError(f"{where}: not valid UTF-8 JSON ({e.reason} at byte {e.start}).") from None
  nesting = depth(text)
  if nesting > max_depth:
    raise UserError(f"{where}: JSON nested {nesting} deep (at most {max_depth}); not a store file.")
  return parse(text, where)


def parse(text: str, where: str, object_pairs_hook=None):
  """JSON ``text`` parsed with the limits of :func:`loads` (digits, number sizes, no NaN or
  Infinity), its nesting already checked; ``object_pairs_hook`` as in ``json.loads``."""
  try:
    return json.loads(text, parse_int=_parse_int, parse_float=_parse_float,
                      parse_constant=_refuse_constant, object_pairs_hook=object_pairs_hook)
  except (ValueError, RecursionError, OverflowError) as e:
    raise UserError(f"{where}: not valid JSON ({printable(str(e), 200)}).") from None


def read_regular(path: str, max_bytes: int, where: str | None = None,
                 follow_links: bool = False) -> bytes:
  """The bytes of the regular file ``path`` (symbolic links not followed unless
  ``follow_links``), at most ``max_bytes`` of them: FileNotFoundError if it is missing,
  UserError if it is something else than a regular file or larger than ``max_bytes``."""
  where = where or path
  fd = open_regular(path, where, follow_links)
  try:
    size = os.fstat(fd).st_size
    if size > max_bytes:
      raise UserError(f"{where}: {size} bytes, more than the {max_bytes} allowed.")
    chunks, left = [], size + 1  # one byte more tells a file that grew while being read
    while left > 0:
      chunk = os.read(fd, min(left, 1 << 20))
      if not chunk:
        break
      chunks.append(chunk)
      left -= len(chunk)
    data = b"".join(chunks)
    if len(data) > max_bytes:
      raise UserError(f"{where}: more than the {max_bytes} bytes allowed.")
    return data
  finally:
    os.close(fd)


def open_regular(path: str, where: str | None = None, follow_links: bool = False) -> int:
  """A read-only descriptor of the regular file ``path``, opened without following a final
  symbolic link (unless ``follow_links``: a model folder of the user's own, such as a
  Hugging Face cache snapshot) and without blocking (a FIFO does not stall the caller):
  FileNotFoundError if it is missing, UserError for anything but a regular file."""
  where = where or path
  flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
  if not follow_links:
    flags |= getattr(os, "O_NOFOLLOW", 0)
  try:
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
  except FileNotFoundError:
    raise
  except NotADirectoryError:
    raise UserError(f"{where}: a part of the path is a file, not a folder.") from None
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise UserError(f"{where}: is a symbolic link, not a regular file.") from None
    if e.errno in (errno.EMFILE, errno.ENFILE):
      raise LimitError(f"{where}: cannot be opened: this process has too many files open "
                       f"({e.strerror}); raise the limit (ulimit -n) and run again.") from None
    raise UserError(f"{where}: cannot be opened as a regular file ({e.strerror}).") from None
  mode = os.fstat(fd).st_mode
  if not stat.S_ISREG(mode):
    os.close(fd)
    kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
    raise UserError(f"{where}: is {kind}, not a regular file.")
  if hasattr(os, "set_blocking"):
    os.set_blocking(fd, True)
  return fd


def only_ours(info: os.stat_result) -> bool:
  """Whether only this process's user (and the system's administrator) may write the file
  ``info`` describes: owned by this user, no write permission for its group or others
  (where a file has an access control list, the group bits are its mask)."""
  geteuid = getattr(os, "geteuid", None)
  return geteuid is None or info.st_uid == geteuid() and not info.st_mode & 0o022


def printable(value, limit: int = 200) -> str:
  """A one-line version of an untrusted value for a terminal: control and other
  non-printable characters (escape sequences, line breaks, bidirectional marks) become
  ``?``; at most ``limit`` characters."""
  text = value if isinstance(value, str) else ("?" if value is None else str(value))
  text = "".join(c if c.isprintable() else "?" for c in text)
  return text if len(text) <= limit else text[:limit - 3] + "..."


def printable_path(path: str) -> str:
  """``path`` as printable text: bytes that are not UTF-8 (kept by Python as surrogates) as
  ``\\xff``."""
  try:
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
  except UnicodeEncodeError:
    return path.encode("utf-8", "backslashreplace").decode("utf-8")


def check_utf8(path: str, prefix: str = "", subject: str = "") -> None:
  """Raises UserError when ``path`` is not valid UTF-8 (a name with other bytes reaches Python
  as surrogates, which no file of a store or of results can hold): ``<prefix><path>:
  <subject>not valid UTF-8; ...``."""
  try:
    path.encode("utf-8")
  except UnicodeEncodeError:
    raise UserError(f"{prefix}{printable_path(path)}: {subject}not valid UTF-8; give a path "
                    "whose every name is valid UTF-8 (rename it, or use another).") from None
