"""The Store: the one door to a store's objects (layout and schemas in :mod:`.layout`).

Reads check everything (schemas, names, sizes, sha256); writes follow the protocol's order
(files, then the JSON that makes them visible, then ``LATEST`` by compare-and-swap).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import tempfile
from typing import Callable, Optional

from cold_fusion_tf import __version__
from cold_fusion_tf.errors import LimitError, UserError
from cold_fusion_tf.store import backends
from cold_fusion_tf.store import layout
from cold_fusion_tf.store import paths
from cold_fusion_tf.store import untrusted
from cold_fusion_tf.store.layout import (BODY, CONTRIBUTION, FORMAT_VERSION, LATEST_FILE, MANIFEST,
                                         MODEL, RUN_FILE, check_contribution_meta,
                                         check_manifest)
from cold_fusion_tf.tensors import safetensors_io


_MAX_LATEST_BYTES = 64


class LostRace(Exception):
  """Another process published this iteration first (not an error for the caller)."""


@dataclasses.dataclass
class Contribution:
  contributor_id: str
  meta: dict
  body_name: str  # object name of body.safetensors
  created_ns: int = 0  # when the storage created its body (not a writer's claim)


def _corrupt(where: str) -> UserError:
  """The error for a base file that does not match its manifest."""
  return UserError(f"{where}: size or sha256 does not match the manifest; the base is corrupt. "
                   "Republish it or restore the file.")


def _open_base_file(path: str, where: str) -> int:
  """A read descriptor of a base's file: a regular file (not a symbolic link, FIFO or device),
  else a UserError that says the base is damaged."""
  try:
    return untrusted.open_regular(path, where)
  except FileNotFoundError:
    raise UserError(f"{where}: listed in the manifest but missing.") from None
  except LimitError:
    raise
  except UserError as e:
    raise UserError(f"{e} The base is damaged or tampered with: restore the file, or "
                    "withdraw the base with `python -m cold_fusion_tf.rollback`.") from None


class Store:
  """A ColD Fusion store at a URI (local directory or gs://bucket/prefix)."""

  def __init__(self, uri: str, cache_dir: Optional[str] = None):
    untrusted.check_utf8(uri, subject="the store's path is ")
    self.uri = uri
    self.storage = backends.open_storage(uri)
    self.cache_dir = cache_dir or os.path.join(
        os.environ.get("COLD_FUSION_CACHE", os.path.expanduser("~/.cache/cold_fusion_tf")),
        hashlib.sha256(uri.encode()).hexdigest()[:16])

  def check_writable(self, what: str = "--store") -> None:
    """For a local store: raises UserError unless files can be created in its folder (made
    for the test if missing; nothing is left behind), so a program that writes finds out
    before any long work. ``what`` names the store in the message. A remote store's
    permissions show at its first write."""
    if isinstance(self.storage, backends.LocalStorage):
      self.storage.check_writable(f"{what}={self.uri}")

  # ------------------------------------------------------------------ run.json
  def exists(self) -> bool:
    return self.storage.exists(RUN_FILE)

  def run_info(self) -> dict:
    try:
      data = self.storage.read_bytes(RUN_FILE, layout.MAX_JSON_BYTES)
    except FileNotFoundError:
      raise UserError(f"{self.uri} is not a ColD Fusion store (no {RUN_FILE}). Create one with "
                      "`python -m cold_fusion_tf.run --config=... --store=...` or "
                      "`python -m cold_fusion_tf.init --config=... --store=... "
                      "--config.model.source=...`.") from None
    info = layout.parse_json(data, f"{self.uri}/{RUN_FILE}")
    if info.get("format_version") != FORMAT_VERSION:
      raise UserError(f"{self.uri}/{RUN_FILE}: store format version "
                      f"{info.get('format_version')!r}; this code reads version {FORMAT_VERSION}.")
    layout.require(info, "model_type", str, f"{self.uri}/{RUN_FILE}")
    return info

  def create(self, source_dir: str, run_settings: dict) -> bool:
    """Writes run.json and publishes base 0 from a checked HF model directory.

    Returns False if the store already existed (then nothing is written). A store whose
    creation was interrupted (run.json but no LATEST) is completed.
    """
    config = layout.parse_json(open(os.path.join(source_dir, "config.json"), "rb").read(),
                         os.path.join(source_dir, "config.json"))
    if not self.exists():
      leftovers = [n for n in self.storage.list_children("") if n not in ("bases",)]
      if leftovers:
        raise UserError(f"{self.uri} is not empty and not a ColD Fusion store (found "
                        f"{leftovers[:5]}); use an empty directory or an existing store.")
      info = {"format_version": FORMAT_VERSION, "model_type": config["model_type"],
              "source_model": run_settings.get("source_model", ""),
              "settings": run_settings, "code_version": __version__}
      self.storage.create_exclusive(RUN_FILE, layout.json_bytes(info))
    if self.latest() is not None:
      return False
    try:
      self.publish_base(0, source_dir, {"parent": None,
                                        "source_model": run_settings.get("source_model", "")})
    except LostRace:
      pass
    return True

  # ------------------------------------------------------------------ bases
  def latest(self) -> Optional[int]:
    """The newest complete iteration, or None before base 0 is published."""
    try:
      raw = self.storage.read_bytes(LATEST_FILE, _MAX_LATEST_BYTES)
    except FileNotFoundError:
      return None
    return self._parse_latest(raw)

  def next_iteration(self, latest: int) -> int:
    """The iteration the next fusion of base ``latest`` publishes (see
    :func:`layout.next_iteration`: past every base a rollback withdrew)."""
    withdrawn = layout.withdrawn_up_to(self.storage.list_children(layout.ROLLBACKS))
    return layout.next_iteration(latest, withdrawn)

  def _parse_latest(self, raw: bytes) -> int:
    text = raw.decode("ascii", errors="replace").strip()
    if not (text.isdigit() and len(text) <= 6):
      raise UserError(f"{self.uri}/{LATEST_FILE}: {text[:40]!r} is not an iteration number.")
    return int(text)

  def require_latest(self) -> int:
    self.run_info()
    latest = self.latest()
    if latest is None:
      raise UserError(f"{self.uri}: no base has been published yet (no {LATEST_FILE}).")
    return latest

  def base_prefix(self, iteration: int) -> str:
    return f"bases/{paths.iteration_name(iteration)}"

  def manifest(self, iteration: int) -> dict:
    name = f"{self.base_prefix(iteration)}/{MANIFEST}"
    try:
      data = self.storage.read_bytes(name, layout.MAX_JSON_BYTES)
    except FileNotFoundError:
      raise UserError(f"{self.uri}/{name}: missing; base {iteration} is not complete.") from None
    manifest = check_manifest(layout.parse_json(data, f"{self.uri}/{name}"), f"{self.uri}/{name}")
    if manifest["iteration"] != iteration:
      raise UserError(f"{self.uri}/{name}: says iteration {manifest['iteration']}, expected "
                      f"{iteration}.")
    return manifest

  def base_sha256(self, iteration: int) -> str:
    return self.manifest(iteration)["files"][MODEL]["sha256"]

  def check_complete(self, iteration: int) -> None:
    """Raises UserError unless base ``iteration`` has a valid manifest and every file it lists,
    of the listed size (a cheap check: no file is read or downloaded)."""
    manifest, prefix = self.manifest(iteration), self.base_prefix(iteration)
    for name, info in sorted(manifest["files"].items()):
      found = self.storage.stat(f"{prefix}/{name}")
      if found is None or found.size != info["size"]:
        state = "missing" if found is None else f"{found.size} bytes, not {info['size']}"
        raise UserError(f"{self.uri}/{prefix}/{name}: {state} as its manifest says; base "
                        f"{iteration} is damaged: restore it, or withdraw it with "
                        "`python -m cold_fusion_tf.rollback`.")

  def base_dir(self, iteration: int) -> str:
    """A local directory holding base ``iteration``, every file checked against the manifest."""
    return self._base_dir(iteration, None)[0]

  def base_dir_checked_later(self, iteration: int, name: str) -> tuple[str, Callable[[], None]]:
    """:meth:`base_dir`, but when the store holds the base in a local directory, the sha256
    of its file ``name`` (a large one) is left to the returned function, which raises
    UserError when it does not match the manifest: a caller hashes it while it reads the file
    for other work, and calls it before anything it computed from the file is trusted."""
    local, deferred = self._base_dir(iteration, name)
    if deferred is None:
      return local, lambda: None
    path = os.path.join(local, name)

    def check() -> None:
      if safetensors_io.sha256_file(path, 1 << 20) != deferred:
        raise _corrupt(f"{self.uri}/{self.base_prefix(iteration)}/{name}")
    return local, check

  def _base_dir(self, iteration: int, later: Optional[str],
                manifest: Optional[dict] = None) -> tuple[str, Optional[str]]:
    """:meth:`base_dir`, and with ``later`` the file of the store's own directory whose
    sha256 is left to the caller: (the directory, that file's expected sha256 or None)."""
    manifest = manifest or self.manifest(iteration)
    deferred = None
    prefix = self.base_prefix(iteration)
    local = self.storage.local_path(prefix)
    cached = local is None  # a remote store's base, fetched into the cache
    if cached:
      local = os.path.join(self.cache_dir, prefix)
      os.makedirs(local, exist_ok=True)
    for name, info in sorted(manifest["files"].items()):
      path = os.path.join(local, name)
      if cached:
        fresh = (os.path.exists(path) and os.path.getsize(path) == info["size"]
                 and safetensors_io.sha256_file(path) == info["sha256"])
        if fresh:
          continue
        try:
          self.storage.download(f"{prefix}/{name}", path, info["size"])
        except FileNotFoundError:
          raise UserError(f"{self.uri}/{prefix}/{name}: listed in the manifest but missing.") from None
      hashed = name != later or cached
      self._check_file(path, info, f"{self.uri}/{prefix}/{name}", hashed)
      if not hashed:
        deferred = info["sha256"]
    if cached:
      # The cache holds exactly the manifest's files (a store recreated at the same URI may
      # have left others behind); downloads in progress (*.partial) are left alone.
      for name in os.listdir(local):
        path = os.path.join(local, name)
        if name not in manifest["files"] and not name.endswith(".partial") and os.path.isfile(path):
          try:
            os.remove(path)
          except FileNotFoundError:
            pass
    return local, deferred

  @staticmethod
  def _check_file(path: str, info: dict, where: str, hashed: bool = True) -> None:
    """Raises UserError unless ``path`` is a regular file (not a symbolic link, FIFO or
    device) of the manifest's size and, when ``hashed``, sha256, read through one descriptor."""
    fd = _open_base_file(path, where)
    with os.fdopen(fd, "rb") as f:
      if os.fstat(fd).st_size != info["size"] or hashed and safetensors_io.sha256_stream(
          f, 1 << 20) != info["sha256"]:
        raise _corrupt(where)

  def copy_base(self, iteration: int, out_dir: str, skip: tuple = ()) -> dict:
    """Copies every file of base ``iteration`` (but those named in ``skip``) into the existing
    folder ``out_dir`` and returns its manifest: each file is hashed as it is copied, so what
    lands there is what the manifest names, whatever is done to the store meanwhile (else a
    UserError)."""
    manifest, prefix = self.manifest(iteration), self.base_prefix(iteration)
    local = self.storage.local_path(prefix)
    if local is None:  # a remote store's base: fetched into the cache and checked there
      local = self._base_dir(iteration, None, manifest)[0]
    written = []
    try:
      for name, info in sorted(manifest["files"].items()):
        if name in skip:
          continue
        where = f"{self.uri}/{prefix}/{name}"
        fd = _open_base_file(os.path.join(local, name), where)
        digest, left = hashlib.sha256(), info["size"] + 1  # one more byte: a file that grew
        with os.fdopen(fd, "rb") as source, open(os.path.join(out_dir, name), "xb") as target:
          written.append(target.name)  # (only what this call created is removed on failure)
          while left > 0 and (block := source.read(min(left, 8 << 20))):
            digest.update(block)
            target.write(block)
            left -= len(block)
        if left != 1 or digest.hexdigest() != info["sha256"]:
          raise _corrupt(where)
    except BaseException:
      for path in written:  # nothing half copied is left behind
        with contextlib.suppress(OSError):
          os.remove(path)
      raise
    return manifest

  def publish_base(self, iteration: int, local_dir: str, manifest_fields: dict, *,
                   known_sha256: Optional[dict] = None, move: bool = False,
                   parent: Optional[int] = None) -> dict:
    """Uploads a base directory, writes its manifest, then moves LATEST (compare-and-swap).

    ``known_sha256``: {file name: sha256} already computed by the caller as it wrote the file
    (others are hashed here). ``move``: the files of ``local_dir`` may be moved into the store
    instead of copied (see :meth:`Storage.upload`). ``parent``: the base LATEST must still
    name (default ``iteration - 1``; another after a rollback). Raises LostRace if LATEST is
    not, or no longer, at ``parent``.
    """
    expected_latest = None if iteration == 0 else iteration - 1 if parent is None else parent
    raw, token = self.storage.read_versioned(LATEST_FILE)
    current = None if raw is None else self._parse_latest(raw)
    if current != expected_latest:
      raise LostRace(f"LATEST is {current}, not {expected_latest}")
    prefix = self.base_prefix(iteration)
    files = {}
    for name in sorted(os.listdir(local_dir)):
      path = os.path.join(local_dir, name)
      if name == MANIFEST or not os.path.isfile(path) or name.endswith(".partial"):
        continue
      paths.check_path_part(name, "Base file name")
      sha = (known_sha256 or {}).get(name) or safetensors_io.sha256_file(path)
      files[name] = {"sha256": sha, "size": os.path.getsize(path)}
      self._check_latest_unmoved(token, iteration)
      self.storage.upload(path, f"{prefix}/{name}", move=move)
    manifest = {"format_version": FORMAT_VERSION, "iteration": iteration, "files": files,
                "code_version": __version__, **manifest_fields}
    check_manifest(manifest, "new manifest")
    self._check_latest_unmoved(token, iteration)
    self.storage.write_bytes(f"{prefix}/{MANIFEST}", layout.json_bytes(manifest))
    if not self.storage.compare_and_swap(LATEST_FILE, f"{iteration}\n".encode(), token):
      raise LostRace(f"LATEST moved while publishing iteration {iteration}")
    return manifest

  def _check_latest_unmoved(self, token, iteration: int) -> None:
    """Raises LostRace once another fuser has moved LATEST, so that a slower racer stops
    writing into a base directory that is already published."""
    if self.storage.read_versioned(LATEST_FILE)[1] != token:
      raise LostRace(f"LATEST moved while publishing iteration {iteration}")

  # ------------------------------------------------------------------ contributions
  def contribution_prefix(self, iteration: int, contributor_id: str) -> str:
    paths.check_path_part(contributor_id, "Contributor id")
    return f"contributions/{paths.iteration_name(iteration)}/{contributor_id}"

  def has_contribution(self, iteration: int, contributor_id: str) -> bool:
    return self.storage.exists(f"{self.contribution_prefix(iteration, contributor_id)}/{CONTRIBUTION}")

  def put_contribution(self, iteration: int, contributor_id: str, body_path: str,
                       meta: dict, sign=None) -> dict:
    """Uploads body.safetensors, then contribution.json, both by exclusive create: one body
    per id. The same body again (a retry, or a second process of the same contributor) is
    taken as done and returns the stored metadata; a different body under a taken id is a
    UserError, raised before anything is overwritten. ``sign(meta) -> str`` adds a signature.
    """
    prefix = self.contribution_prefix(iteration, contributor_id)
    sha = safetensors_io.sha256_file(body_path)
    meta = {"format_version": FORMAT_VERSION, "base_iteration": iteration,
            "contributor_id": contributor_id, "body_sha256": sha,
            "body_size": os.path.getsize(body_path), "code_version": __version__, **meta}
    if sign is not None:
      meta["signature"] = sign(meta)
    check_contribution_meta(meta, "new contribution")
    if len(layout.json_bytes(meta)) > layout.MAX_CONTRIBUTION_BYTES:
      raise UserError(f"the contribution.json of {contributor_id!r} would be "
                      f"{len(layout.json_bytes(meta))} bytes, more than the "
                      f"{layout.MAX_CONTRIBUTION_BYTES} a fuser reads; record fewer dev metrics.")
    taken = (f"{self.uri}/{prefix}: contributor {contributor_id!r} already contributed another "
             f"body to iteration {iteration}; use another --config.contributor_id.")
    stored = self.contribution_meta(iteration, contributor_id)
    if stored is None:
      if not self.storage.upload_exclusive(body_path, f"{prefix}/{BODY}"):
        if self.stored_body_sha256(iteration, contributor_id) != sha:
          raise UserError(taken)
      if self.storage.create_exclusive(f"{prefix}/{CONTRIBUTION}", layout.json_bytes(meta)):
        return meta
      stored = self.contribution_meta(iteration, contributor_id)
    if stored is None or stored.get("body_sha256") != sha:
      raise UserError(taken)
    return stored

  def contribution_meta(self, iteration: int, contributor_id: str) -> Optional[dict]:
    """The checked contribution.json of one contributor (None when there is none)."""
    name = f"{self.contribution_prefix(iteration, contributor_id)}/{CONTRIBUTION}"
    try:
      data = self.storage.read_bytes(name, layout.MAX_CONTRIBUTION_BYTES)
    except FileNotFoundError:
      return None
    return layout.read_contribution_meta(data, f"{self.uri}/{name}")

  def stored_body_sha256(self, iteration: int, contributor_id: str) -> Optional[str]:
    """The sha256 of a contributor's stored body.safetensors, read back (None if missing)."""
    name = f"{self.contribution_prefix(iteration, contributor_id)}/{BODY}"
    local = self.storage.local_path(name)
    with staging_dir("readback") as work:
      if local is None:
        local = os.path.join(work, BODY)
        try:
          self.storage.download(name, local)
        except FileNotFoundError:
          return None
      try:
        fd = untrusted.open_regular(local, f"{self.uri}/{name}")
      except FileNotFoundError:
        return None
      with os.fdopen(fd, "rb") as f:
        return safetensors_io.sha256_stream(f)

  def check_own_contribution(self, iteration: int, contributor_id: str, meta: dict) -> None:
    """Reads a contribution back: its contribution.json is ``meta`` and its body has the
    sha256 it names; a UserError otherwise (then keep whatever could make it again)."""
    stored = self.contribution_meta(iteration, contributor_id)
    where = f"{self.uri}/{self.contribution_prefix(iteration, contributor_id)}"
    if stored != meta:
      raise UserError(f"{where}: contribution.json is not the one just written; keep the "
                      "checkpoints and run again with another --config.contributor_id.")
    if self.stored_body_sha256(iteration, contributor_id) != meta["body_sha256"]:
      raise UserError(f"{where}: the stored body does not match its sha256; keep the "
                      "checkpoints and run again with another --config.contributor_id.")

  def contributions(self, iteration: int) -> tuple[list[Contribution], list[dict]]:
    """(complete contributions with parsed metadata, rejections for unreadable ones)."""
    folder = f"contributions/{paths.iteration_name(iteration)}"
    found, rejected = [], []
    try:
      children = self.storage.list_children(folder)
    except LimitError:  # the storage failed (or this machine's limits): no one's fault
      raise
    except UserError as e:  # e.g. a folder that is a link out of the store: nothing counts
      return [], [{"id": folder, "reason": str(e)}]
    for cid in children:
      try:
        paths.check_path_part(cid, "Contributor id")
      except UserError as e:
        rejected.append({"id": cid, "reason": str(e)})
        continue
      prefix = f"{folder}/{cid}"
      try:
        info = self.storage.stat(f"{prefix}/{CONTRIBUTION}")
        if info is None:
          continue  # incomplete: invisible
        data = self.storage.read_bytes(f"{prefix}/{CONTRIBUTION}",
                                       layout.MAX_CONTRIBUTION_BYTES)
        meta = layout.read_contribution_meta(data, f"{prefix}/{CONTRIBUTION}")
        if meta["contributor_id"] != cid:
          raise UserError(f"{prefix}/{CONTRIBUTION}: contributor_id {meta['contributor_id']!r} "
                          f"does not match its folder {cid!r}.")
      except FileNotFoundError:
        continue  # removed while being listed: invisible
      except LimitError:
        raise
      except UserError as e:
        rejected.append({"id": cid, "reason": str(e)})
        continue
      try:
        body = self.storage.stat(f"{prefix}/{BODY}")
      except LimitError:
        raise
      except UserError:
        body = None  # validation rejects it, with the reason
      created = body.created_ns if body is not None else info.created_ns
      found.append(Contribution(cid, meta, f"{prefix}/{BODY}", created))
    return found, rejected

  def fetch_body(self, contribution: Contribution, workdir: str,
                 max_bytes: Optional[int] = None, copy: bool = False) -> tuple[str, Optional[int]]:
    """A local path of a contribution's body, and when the storage created the object that
    path holds (None: the store's own file, read in place; its open file tells). A local
    store gives its own file unless ``copy``; otherwise the body is copied into ``workdir``
    (downloaded from remote stores) when it is at most ``max_bytes``, checked before any byte
    is copied."""
    local = self.storage.local_path(contribution.body_name)
    if local is not None and not copy:
      if not os.path.lexists(local):
        raise UserError(f"{self.uri}/{contribution.body_name}: missing.")
      return local, None
    path = os.path.join(workdir, f"{contribution.contributor_id}.safetensors")
    try:
      info = self.storage.download(contribution.body_name, path, max_bytes)
    except FileNotFoundError:
      raise UserError(f"{self.uri}/{contribution.body_name}: missing.") from None
    return path, info.created_ns

  # ------------------------------------------------------------------ fusion bookkeeping
  def has_plan(self, target: int) -> bool:
    """Whether the fusion that publishes base ``target`` has a plan."""
    return self.storage.exists(layout.plan_name(target))

  def read_plan(self, target: int) -> tuple[Optional[bytes], object]:
    """The raw plan of the fusion that publishes base ``target`` (None if there is none) and
    its version token for :meth:`write_plan`."""
    return self.storage.read_versioned(layout.plan_name(target))

  def write_plan(self, target: int, plan: dict, token: object = None) -> bool:
    """Creates the plan (``token`` None or 0) or replaces the version ``token`` names;
    False when another fuser wrote it first."""
    name, data = layout.plan_name(target), layout.json_bytes(plan)
    if token in (None, 0):
      return self.storage.create_exclusive(name, data)
    return self.storage.compare_and_swap(name, data, token)

  def put_state(self, target: int, local_path: str) -> None:
    """Stores the server optimizer state saved with base ``target`` (moved from
    ``local_path``)."""
    self.storage.upload(local_path, layout.state_name(target), move=True)

  def fetch_state(self, iteration: int, workdir: str) -> Optional[str]:
    """A local path of the server optimizer state saved with base ``iteration`` (downloaded
    into ``workdir`` from a remote store), or None if it is missing."""
    name = layout.state_name(iteration)
    path = self.storage.local_path(name)
    if path is None:
      path = os.path.join(workdir, "previous_" + layout.STATE)
      try:
        self.storage.download(name, path)
      except FileNotFoundError:
        return None
    return path if os.path.exists(path) else None

  # ------------------------------------------------------------------ evaluations, reports
  def write_json(self, name: str, obj) -> None:
    self.storage.write_bytes(name, layout.json_bytes(obj))

  def read_json(self, name: str) -> Optional[dict]:
    try:
      data = self.storage.read_bytes(name, layout.MAX_JSON_BYTES)
    except FileNotFoundError:
      return None
    return layout.parse_json(data, f"{self.uri}/{name}")

  def write_file(self, name: str, local_path: str) -> None:
    self.storage.upload(local_path, name)


def staging_dir(prefix: str) -> tempfile.TemporaryDirectory:
  """A temporary local directory for building a base or a body before upload."""
  return tempfile.TemporaryDirectory(prefix=f"cold_fusion_{prefix}_")
