"""Storage backends for a store URI: a local directory or ``gs://bucket/prefix``.

A backend speaks in relative object names (``bases/000001/model.safetensors``) and offers
exactly what the store protocol needs: whole-object reads and writes, streaming transfers
to and from local files, listing, and two atomic primitives: an exclusive create and a
compare-and-swap on one small object (used for ``LATEST``).

Every object name the code builds is checked by :func:`check_object_name` before use.
"""

from __future__ import annotations

from cold_fusion_tf.errors import UserError
from cold_fusion_tf.store.backends.base import Storage
from cold_fusion_tf.store.backends.local import LocalStorage

__all__ = ["LocalStorage", "Storage", "open_storage"]


def open_storage(uri: str) -> Storage:
  """The backend for a store URI (``gs://bucket/prefix`` or a local directory)."""
  if not uri:
    raise UserError("The store is empty: pass --store=DIR (a local directory) or --store=gs://bucket/prefix.")
  if uri.startswith("gs://"):
    from cold_fusion_tf.store.backends import gcs  # pylint: disable=g-import-not-at-top
    return gcs.GCSStorage.from_uri(uri)
  if "://" in uri:
    raise UserError(f"Unsupported store URI {uri!r}: use a local directory or gs://bucket/prefix.")
  return LocalStorage(uri)
