"""Which base a reference means: ``STORE`` (its latest base), ``STORE@N`` (base N), a Hugging
Face model directory, or ``package:<module>/<folder>`` (a model shipped in a package).

The one resolver used by the Keras API, the evaluate program and the export program.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional

from cold_fusion_tf.errors import UserError
from cold_fusion_tf.model.sources import PACKAGE_PREFIX, resolve_source
from cold_fusion_tf.store.layout import MODEL, RUN_FILE
from cold_fusion_tf.store.store import Store
from cold_fusion_tf.tensors import safetensors_io

_STORE_REF = re.compile(r"(.+)@([0-9]{1,6})")


@dataclasses.dataclass(frozen=True)
class BaseRef:
  """A resolved base: a name for people, a checked local model directory, its weights'
  sha256, and the store and iteration it comes from (None for a model directory)."""
  name: str
  directory: str
  sha256: str
  store: Optional[Store] = None
  iteration: Optional[int] = None


def split(spec: str) -> tuple[str, Optional[int]]:
  """``"STORE@3"`` -> ``("STORE", 3)``; anything else -> ``(spec, None)``."""
  spec = (spec or "").strip()
  match = _STORE_REF.fullmatch(spec)
  return (match.group(1), int(match.group(2))) if match else (spec, None)


def is_store(location: str) -> bool:
  """Whether ``location`` names a store (``gs://`` or a directory holding ``run.json``)."""
  return location.startswith("gs://") or os.path.isfile(os.path.join(location, RUN_FILE))


def check(spec: str, what: str = "--base") -> None:
  """Raises UserError when ``spec`` can name no base, found without reading a store: a local
  location that does not exist or is a file, or an ``@`` not followed by a base number
  (:func:`resolve` finds the rest: a base that is not published, a folder that is neither a
  store nor a model directory)."""
  location, _ = split(spec)
  if not location:
    raise UserError(f"{what} is empty: give a store (STORE or STORE@N) or a model directory.")
  if "://" in location or location.startswith(PACKAGE_PREFIX) or os.path.isdir(location):
    return
  head, at, number = location.rpartition("@")
  if at and head and os.path.exists(head) and not os.path.exists(location):
    if os.path.isdir(head) and re.fullmatch(r"[0-9]{1,6}", number):
      raise UserError(f"{what}={spec}: more than one @N; STORE@N names one base of STORE.")
    if os.path.isdir(head):
      raise UserError(f"{what}={spec}: {number!r} is not a base number; STORE@N takes N, a "
                      "whole number from 0 to 999999 (base N of the store; STORE alone is "
                      "its latest base).")
    location = head
  if os.path.exists(location):
    raise UserError(f"{what}={spec}: {location} is a file (expected a store or a model "
                    "directory).")
  raise UserError(f"{what}={spec}: {location} does not exist (expected a store or a model "
                  "directory).")


def resolve(spec: str, iteration: Optional[int] = None, what: str = "--base") -> BaseRef:
  """The base ``spec`` names; ``iteration`` (or ``@N`` in ``spec``) picks a store's base.

  A store's bases are fetched (remote stores) and checked against their manifests; a model
  directory must hold ``config.json`` and ``model.safetensors``.
  """
  spec = os.fspath(spec) if not isinstance(spec, str) else spec
  check(spec, what)
  location, at = split(spec)
  if at is not None and iteration is not None and at != iteration:
    raise UserError(f"{what}={spec}: names base {at}, but iteration={iteration} was asked for.")
  iteration = at if at is not None else iteration
  if location.startswith(PACKAGE_PREFIX):
    location = resolve_source(location)
  if is_store(location):
    store = Store(location)
    latest = store.require_latest()
    iteration = latest if iteration is None else iteration
    if (not isinstance(iteration, int) or isinstance(iteration, bool)
        or not 0 <= iteration <= latest):
      raise UserError(f"{what}={spec}: base {iteration!r} is not published; {location} holds "
                      f"bases 0..{latest}.")
    return BaseRef(f"{location}@{iteration}", store.base_dir(iteration),
                   store.base_sha256(iteration), store, iteration)
  if not os.path.isdir(location):
    raise UserError(f"{what}={spec}: {location} does not exist (expected a store or a model "
                    "directory).")  # a package's model folder (checked above otherwise)
  if iteration is not None:
    raise UserError(f"{what}={spec}: {location} is a model directory, not a store; drop the "
                    "iteration.")
  for name in ("config.json", MODEL):
    if not os.path.isfile(os.path.join(location, name)):
      raise UserError(f"{what}={spec}: {location} is neither a ColD Fusion store (no "
                      f"{RUN_FILE}) nor a Hugging Face model directory (no {name}).")
  return BaseRef(location, location,
                 safetensors_io.sha256_file(os.path.join(location, MODEL)))


def default_reference(spec: str) -> Optional[str]:
  """``STORE@0`` (the original base) when ``spec`` names a store, else None."""
  location, _ = split(spec)
  return f"{location}@0" if is_store(location) else None
