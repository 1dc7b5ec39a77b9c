"""A store in a local directory (see :class:`LocalStorage`)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
import uuid
from typing import Iterator, Optional

from cold_fusion_tf.errors import LimitError, UserError
from cold_fusion_tf.store import untrusted
from cold_fusion_tf.store.backends.base import ObjectInfo, Storage
from cold_fusion_tf.store.paths import check_object_name


class LocalStorage(Storage):
  """A store in a local directory.

  Writes go to a temporary file in the same directory and are renamed into place, so a
  reader sees either the old or the new object. The compare-and-swap holds an OS lock
  (``flock`` on a hidden lock file beside the object) while it checks and renames: the lock
  ends with the process that holds it, so a killed process never leaves a lock behind.
  Reads take regular files only, never through a symbolic link that leads out of the store.
  A write the system refuses (no such folder, no permission, a full disk) is a UserError
  naming the object and the system's reason.
  """

  def __init__(self, root: str):
    self.root = os.path.abspath(root)
    self.uri = self.root

  def check_writable(self, what: str) -> None:
    """Raises UserError unless files can be created in the store's folder (see
    :func:`check_writable_folder`; nothing is left behind). ``what`` names the store in the
    message (``--store=...``)."""
    check_writable_folder(self.root, what)

  @contextlib.contextmanager
  def _writing(self, name: str) -> Iterator[None]:
    """Turns an OSError of the writes inside into a UserError naming object ``name``."""
    try:
      yield
    except OSError as e:
      where = f"{self.uri}/{name}" if name else self.uri
      raise _os_error(e, f"{where}: cannot write it into the store ({os_reason(e)}); check "
                      f"that {self.root} is a folder you may write to, on a disk with free "
                      "space.") from None

  def _path(self, name: str) -> str:
    check_object_name(name)
    path = os.path.join(self.root, *name.split("/")) if name else self.root
    if name:
      real_root, real = os.path.realpath(self.root), os.path.realpath(path)
      if real != real_root and not real.startswith(real_root + os.sep):
        raise UserError(f"{self.uri}/{name}: leads out of the store (a symbolic link).")
    return path

  def local_path(self, name: str) -> Optional[str]:
    return self._path(name)

  def read_bytes(self, name: str, max_bytes: Optional[int] = None) -> bytes:
    return untrusted.read_regular(self._path(name), _UNBOUNDED if max_bytes is None else max_bytes,
                                  f"{self.uri}/{name}")

  def stat(self, name: str) -> Optional[ObjectInfo]:
    try:
      fd = untrusted.open_regular(self._path(name), f"{self.uri}/{name}")
    except FileNotFoundError:
      return None
    try:
      info = os.fstat(fd)
    finally:
      os.close(fd)
    return ObjectInfo(info.st_size, info.st_ctime_ns, info.st_ino)

  def _staged(self, path: str, fill) -> str:
    """A complete, synced temporary file beside ``path`` filled by ``fill(f)``."""
    with self._writing(self._name(path)):
      os.makedirs(os.path.dirname(path), exist_ok=True)
      fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
      try:
        if hasattr(os, "fchmod"):  # mkstemp makes it private; an object is an ordinary file
          os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
          fill(f)
          f.flush()
          os.fsync(f.fileno())
      except BaseException:
        remove_quietly(tmp)
        raise
    return tmp

  def _name(self, path: str) -> str:
    """The object name of a path inside the store (for messages)."""
    return os.path.relpath(path, self.root).replace(os.sep, "/")

  def write_bytes(self, name: str, data: bytes) -> None:
    path = self._path(name)
    tmp = self._staged(path, lambda f: f.write(data))
    with self._writing(name):
      _replace(tmp, path)

  def exists(self, name: str) -> bool:
    return os.path.exists(self._path(name))

  def list_children(self, prefix: str) -> list[str]:
    path = self._path(prefix)
    if not os.path.isdir(path):
      return []
    try:
      names = os.listdir(path)
    except OSError as e:  # the store's folder, not any one object in it
      raise LimitError(f"{self.uri}/{prefix}: cannot list it ({os_reason(e)}); check the "
                       "store's permissions.") from None
    # Names starting with "." are this backend's own (staged writes, locks): never objects.
    return sorted(n for n in names if not n.startswith("."))

  def download(self, name: str, local_path: str, max_bytes: Optional[int] = None) -> ObjectInfo:
    src = self._path(name)
    fd = untrusted.open_regular(src, f"{self.uri}/{name}")
    try:
      info = os.fstat(fd)
      if max_bytes is not None and info.st_size > max_bytes:
        raise UserError(f"{self.uri}/{name}: {info.st_size} bytes, more than the {max_bytes} "
                        "allowed.")
      tmp = local_path + ".partial"
      try:
        os.makedirs(os.path.dirname(os.path.abspath(local_path)), exist_ok=True)
        with os.fdopen(os.dup(fd), "rb") as source, open(tmp, "wb") as target:
          shutil.copyfileobj(source, target, 8 << 20)
        os.replace(tmp, local_path)
      except OSError as e:  # this machine's side (or the store's disk), not the object
        remove_quietly(tmp)
        raise LimitError(f"{self.uri}/{name}: cannot copy it to {local_path} "
                         f"({os_reason(e)}).") from None
    finally:
      os.close(fd)
    return ObjectInfo(info.st_size, info.st_ctime_ns, info.st_ino)

  def upload(self, local_path: str, name: str, move: bool = False) -> None:
    path = self._path(name)
    if os.path.abspath(local_path) == path:
      return
    if move and self._link_into_place(local_path, path):
      return

    def copy(f):
      with open(local_path, "rb") as src:
        shutil.copyfileobj(src, f, 8 << 20)

    tmp = self._staged(path, copy)
    with self._writing(name):
      _replace(tmp, path)

  def _link_into_place(self, local_path: str, path: str) -> bool:
    """Syncs ``local_path`` and hard-links it to ``path`` (atomically, through a temporary
    name); False when the two are on different filesystems (or links are not supported)."""
    with self._writing(self._name(path)):
      os.makedirs(os.path.dirname(path), exist_ok=True)
      tmp = os.path.join(os.path.dirname(path), f".tmp-{uuid.uuid4().hex}")
      try:
        os.link(local_path, tmp)
      except OSError as e:
        if e.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
          return False  # the caller copies instead
        raise
      try:
        fd = os.open(tmp, os.O_RDONLY)
        try:
          os.fsync(fd)  # the data is on disk before the name is
        finally:
          os.close(fd)
        os.replace(tmp, path)
      except BaseException:
        remove_quietly(tmp)
        raise
    return True

  def create_exclusive(self, name: str, data: bytes) -> bool:
    return self._link_new(self._path(name), lambda f: f.write(data))

  def upload_exclusive(self, local_path: str, name: str) -> bool:
    def copy(f):
      with open(local_path, "rb") as src:
        shutil.copyfileobj(src, f, 8 << 20)

    return self._link_new(self._path(name), copy)

  def _link_new(self, path: str, fill) -> bool:
    # Write the content aside, then hard-link it into place: link() fails if the
    # name exists, so exactly one of several racing creators wins, with full content.
    tmp = self._staged(path, fill)
    try:
      with self._writing(self._name(path)):
        try:
          os.link(tmp, path)
          return True
        except FileExistsError:
          return False
    finally:
      remove_quietly(tmp)

  def read_versioned(self, name: str) -> tuple[Optional[bytes], object]:
    try:
      data = self.read_bytes(name)
    except FileNotFoundError:
      return None, None
    return data, data

  def compare_and_swap(self, name: str, data: bytes, token: object) -> bool:
    path = self._path(name)
    with self._writing(name):
      os.makedirs(os.path.dirname(path), exist_ok=True)
      # An OS lock, held only while this process runs: waiting for it is waiting for another
      # compare-and-swap to finish (a few milliseconds), and a killed holder frees it.
      fd = os.open(os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock"),
                   os.O_CREAT | os.O_RDWR | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)
      current, _ = self.read_versioned(name)
      if current != token:
        return False
      self.write_bytes(name, data)
      return True
    finally:
      os.close(fd)  # releases the lock; the lock file stays (removing it would race)

  def delete_prefix(self, prefix: str) -> None:
    path = self._path(prefix)
    with self._writing(prefix):
      if os.path.isdir(path):
        shutil.rmtree(path)
      elif os.path.exists(path):
        os.remove(path)


def _umask() -> int:
  """This process's umask (read without changing it where the system tells it)."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  return 0o022


_UNBOUNDED = 1 << 62
# A full disk or quota, too many open files: limits of the machine, not faults of the input.
_LIMITS = (errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE)


def _os_error(error: OSError, message: str) -> UserError:
  """``message`` as a LimitError when ``error`` is a limit of the machine, else a UserError."""
  return (LimitError if error.errno in _LIMITS else UserError)(message)


def os_reason(error: OSError) -> str:
  """What the system said, for a message: ``No such file or directory: /proc/nope``."""
  reason = error.strerror or str(error)
  return f"{reason}: {error.filename}" if error.filename else reason


def check_writable_folder(folder: str, what: str) -> None:
  """Raises UserError unless files can be created in the local ``folder``, found by doing it:
  the missing folders are made, a file is created and removed in it, and the folders made for
  the test are removed again, so nothing is left behind. ``what`` names the folder in the
  message (``--out=results``)."""
  folder = os.path.abspath(folder)
  missing, path = [], folder
  while not os.path.isdir(path) and os.path.dirname(path) != path:
    missing.append(path)
    path = os.path.dirname(path)
  made = []
  try:
    for path in reversed(missing):
      try:
        os.mkdir(path)
        made.append(path)
      except FileExistsError:
        pass  # made meanwhile by another process (a file there fails below)
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".tmp-probe-")
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise _os_error(e, f"{what}: cannot create files there ({os_reason(e)}); give a folder "
                    "you may write to (a new one is created).") from None
  finally:
    for path in reversed(made):
      try:
        os.rmdir(path)
      except OSError:
        pass  # another process put something in it meanwhile: it is theirs


def _replace(tmp: str, path: str) -> None:
  """Renames the staged ``tmp`` to ``path``; removes it when that fails."""
  try:
    os.replace(tmp, path)
  except BaseException:
    remove_quietly(tmp)
    raise


def remove_quietly(path: str) -> None:
  """Removes the file at ``path`` if there is one (none, or no folder: nothing to do)."""
  try:
    os.remove(path)
  except (FileNotFoundError, NotADirectoryError):
    pass
