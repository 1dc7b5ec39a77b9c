"""The storage interface the store protocol is built on (see :mod:`cold_fusion_tf.store.backends`)."""

from __future__ import annotations

import abc
import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
  """What the storage itself (not the object's writer) says about an object."""

  size: int
  # When it was created (GCS: time_created; local: the inode's change time, which writes,
  # renames and hard links move).
  created_ns: int
  version: int     # GCS: its generation; local: the inode number (tells replacements apart)


class Storage(abc.ABC):
  """The operations the store protocol is built on."""

  uri: str

  @abc.abstractmethod
  def read_bytes(self, name: str, max_bytes: Optional[int] = None) -> bytes:
    """The whole object; raises FileNotFoundError if it is missing, and UserError if it is
    larger than ``max_bytes`` (checked before it is read) or not a regular file."""

  @abc.abstractmethod
  def stat(self, name: str) -> Optional[ObjectInfo]:
    """Size and creation of an object (None if missing; UserError if not a regular file)."""

  @abc.abstractmethod
  def write_bytes(self, name: str, data: bytes) -> None:
    """Writes (or replaces) an object; readers never see a partial object."""

  @abc.abstractmethod
  def exists(self, name: str) -> bool:
    """Whether the object exists."""

  @abc.abstractmethod
  def list_children(self, prefix: str) -> list[str]:
    """Sorted names of the immediate children (objects or folders) under ``prefix``."""

  @abc.abstractmethod
  def download(self, name: str, local_path: str, max_bytes: Optional[int] = None) -> ObjectInfo:
    """Streams an object into a local file (written atomically); UserError if it is larger
    than ``max_bytes`` (checked before any byte is transferred). Returns what the storage
    says of the very object copied (replaced since a :meth:`stat`, it is the new one)."""

  @abc.abstractmethod
  def upload(self, local_path: str, name: str, move: bool = False) -> None:
    """Streams a local file into an object. ``move``: the caller gives the file up (it will
    neither change nor need it), so a backend may move it into place instead of copying."""

  @abc.abstractmethod
  def create_exclusive(self, name: str, data: bytes) -> bool:
    """Creates the object only if it does not exist; False if it already did."""

  @abc.abstractmethod
  def upload_exclusive(self, local_path: str, name: str) -> bool:
    """Streams a local file into a new object only if none exists; False if one did."""

  @abc.abstractmethod
  def read_versioned(self, name: str) -> tuple[Optional[bytes], object]:
    """(contents or None if missing, a version token for :meth:`compare_and_swap`)."""

  @abc.abstractmethod
  def compare_and_swap(self, name: str, data: bytes, token: object) -> bool:
    """Writes ``data`` only if the object is still at ``token``; False if it moved."""

  @abc.abstractmethod
  def delete_prefix(self, prefix: str) -> None:
    """Removes every object under ``prefix`` (used to clear incomplete directories)."""

  def local_path(self, name: str) -> Optional[str]:
    """A local filesystem path for the object when the backend has one, else None."""
    del name
    return None
