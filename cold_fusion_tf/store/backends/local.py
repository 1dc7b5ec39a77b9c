"""A store in a local directory (see :class:`LocalStorage`)."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
import uuid
from typing import Optional

from cold_fusion_tf.store.backends.base import Storage
from cold_fusion_tf.store.paths import check_object_name


class LocalStorage(Storage):
  """A store in a local directory.

  Writes go to a temporary file in the same directory and are renamed into place, so a
  reader sees either the old or the new object. The compare-and-swap holds an exclusive
  lock file while it checks and renames.
  """

  def __init__(self, root: str):
    self.root = os.path.abspath(root)
    self.uri = self.root

  def _path(self, name: str) -> str:
    check_object_name(name)
    return os.path.join(self.root, *name.split("/")) if name else self.root

  def local_path(self, name: str) -> Optional[str]:
    return self._path(name)

  def read_bytes(self, name: str) -> bytes:
    with open(self._path(name), "rb") as f:
      return f.read()

  def _staged(self, path: str, fill) -> str:
    """A complete, synced temporary file beside ``path`` filled by ``fill(f)``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
      with os.fdopen(fd, "wb") as f:
        fill(f)
        f.flush()
        os.fsync(f.fileno())
    except BaseException:
      _remove_quietly(tmp)
      raise
    return tmp

  def write_bytes(self, name: str, data: bytes) -> None:
    path = self._path(name)
    os.replace(self._staged(path, lambda f: f.write(data)), path)

  def exists(self, name: str) -> bool:
    return os.path.exists(self._path(name))

  def list_children(self, prefix: str) -> list[str]:
    path = self._path(prefix)
    if not os.path.isdir(path):
      return []
    return sorted(n for n in os.listdir(path) if not n.startswith(".tmp-"))

  def download(self, name: str, local_path: str) -> None:
    src = self._path(name)
    if not os.path.exists(src):
      raise FileNotFoundError(src)
    os.makedirs(os.path.dirname(os.path.abspath(local_path)), exist_ok=True)
    tmp = local_path + ".partial"
    shutil.copyfile(src, tmp)
    os.replace(tmp, local_path)

  def upload(self, local_path: str, name: str, move: bool = False) -> None:
    path = self._path(name)
    if os.path.abspath(local_path) == path:
      return
    if move and self._link_into_place(local_path, path):
      return

    def copy(f):
      with open(local_path, "rb") as src:
        shutil.copyfileobj(src, f, 8 << 20)

    os.replace(self._staged(path, copy), path)

  def _link_into_place(self, local_path: str, path: str) -> bool:
    """Syncs ``local_path`` and hard-links it to ``path`` (atomically, through a temporary
    name); False when the two are on different filesystems (or links are not supported)."""
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
      _remove_quietly(tmp)
      raise
    return True

  def create_exclusive(self, name: str, data: bytes) -> bool:
    path = self._path(name)
    # Write the content aside, then hard-link it into place: link() fails if the
    # name exists, so exactly one of several racing creators wins, with full content.
    tmp = self._staged(path, lambda f: f.write(data))
    try:
      os.link(tmp, path)
      return True
    except FileExistsError:
      return False
    finally:
      _remove_quietly(tmp)

  def read_versioned(self, name: str) -> tuple[Optional[bytes], object]:
    try:
      data = self.read_bytes(name)
    except FileNotFoundError:
      return None, None
    return data, data

  def compare_and_swap(self, name: str, data: bytes, token: object) -> bool:
    path = self._path(name)
    lock = path + ".lock"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
      fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      if _age_seconds(lock) < _STALE_LOCK_SECONDS:
        return False
      _remove_quietly(lock)  # left by a process that died while holding it
      return self.compare_and_swap(name, data, token)
    try:
      current, _ = self.read_versioned(name)
      if current != token:
        return False
      self.write_bytes(name, data)
      return True
    finally:
      os.close(fd)
      _remove_quietly(lock)

  def delete_prefix(self, prefix: str) -> None:
    path = self._path(prefix)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)


_STALE_LOCK_SECONDS = 120.0


def _age_seconds(path: str) -> float:
  try:
    return time.time() - os.path.getmtime(path)
  except FileNotFoundError:
    return 0.0


def _remove_quietly(path: str) -> None:
  try:
    os.remove(path)
  except FileNotFoundError:
    pass
