"""Validation of contributions: each body read once and checked; any problem with one
contribution (whatever it holds) becomes that contribution's rejection, never an abort."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
from typing import Optional

from cold_fusion_tf import store as store_lib
from cold_fusion_tf.errors import LimitError, UserError
from cold_fusion_tf.fusion.settings import Settings
from cold_fusion_tf.store import signing
from cold_fusion_tf.store import untrusted
from cold_fusion_tf.store.untrusted import printable
from cold_fusion_tf.tensors import safetensors_io
from cold_fusion_tf.tensors import streaming

_MAX_REASON = 600
_MAX_METRICS = 32
SPARE_FILES = 64
"""Open files kept free beside the bodies (libraries loaded later, staging files, clients)."""


@dataclasses.dataclass
class Checked:
  contribution: store_lib.Contribution
  body: safetensors_io.BodyFile
  scan: streaming.ScanResult

  @property
  def norm(self) -> float:
    return math.sqrt(self.scan.squared_distance)


def rejection(cid: str, dataset, reason) -> dict:
  if not isinstance(reason, UserError) and isinstance(reason, Exception):
    reason = f"unreadable ({type(reason).__name__}: {reason})"
  entry = {"id": str(cid)[:200], "reason": str(reason)[:_MAX_REASON]}
  if isinstance(dataset, str):
    entry["dataset"] = dataset[:200]
  return entry


def specs_difference(got: dict, want: dict) -> Optional[str]:
  if got == want:
    return None
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  if missing or extra:
    return (f"tensor names do not match the base (missing {missing[:5]}, unexpected "
            f"{extra[:5]}); is it a body of the base's architecture?")
  name = next(n for n in sorted(want) if got[n] != want[n])
  return (f"tensor {name} is {got[name][1]}{list(got[name][0])}, the base has "
          f"{want[name][1]}{list(want[name][0])}")


def _open_body(store, contribution, workdir, limits: dict) -> safetensors_io.BodyFile:
  """Fetches (remote stores: only when its size is within ``limits``) and opens a
  contribution's body, checking its size and header against the base's layout.

  A body in a local store that others than this user may write is copied first: whoever can
  write it could change it in place between its validation and its fusion (the open file
  would show the change). ``contribution.created_ns`` becomes the creation time of the
  object read (a body replaced since the listing is judged as the new object it is)."""
  meta = contribution.meta
  size = meta.get("body_size")
  if isinstance(size, int) and size > limits["max_bytes"]:
    raise UserError(f"contribution.json says body.safetensors has {size} bytes, more than the "
                    f"{limits['max_bytes']} a body of the base's layout can have")
  source = f"{store.uri}/{contribution.body_name}"
  path, created = store.fetch_body(contribution, workdir, limits["max_bytes"])
  body = safetensors_io.BodyFile(path, source=source, **limits)
  if created is None and not untrusted.only_ours(os.fstat(body.fd)):
    body.close()
    path, created = store.fetch_body(contribution, workdir, limits["max_bytes"], copy=True)
    body = safetensors_io.BodyFile(path, source=source, **limits)
  contribution.created_ns = os.fstat(body.fd).st_ctime_ns if created is None else created
  if isinstance(size, int) and body.size != size:
    body.close()
    raise UserError(f"body.safetensors has {body.size} bytes, contribution.json says {size} "
                    "(truncated or changed after upload)")
  return body


def make_room_for_files(count: int, total: int = 0, left: int = 0) -> None:
  """Lets this process hold ``count`` more files open (a fusion keeps every body it validated
  open until it ends) by raising the soft limit on open files, up to the hard one. Without
  ``total`` it makes what room it can. With ``total`` (the contributions being validated,
  ``left`` of them not opened yet) it raises LimitError, before the body that would not fit
  is opened, when even the hard limit is too few."""
  try:
    import resource  # pylint: disable=g-import-not-at-top  (POSIX only)
  except ImportError:
    return
  soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
  try:
    in_use = len(os.listdir("/proc/self/fd"))
  except OSError:
    in_use = SPARE_FILES
  needed = in_use + count + SPARE_FILES
  if soft == resource.RLIM_INFINITY or needed <= soft:
    return
  if hard != resource.RLIM_INFINITY and needed > hard:
    if total:
      wanted = in_use + max(left, count) + SPARE_FILES
      raise LimitError(f"{total} contributions to validate keep their bodies open at once "
                       f"({in_use} files open now), more than this process may open ({hard}: "
                       f"ulimit -n); raise the limit to at least {wanted} (ulimit -n {wanted}) "
                       "and run again. No contribution was rejected.")
    needed = hard
  resource.setrlimit(resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY
                                               else hard, hard))


def _checked_scan(result, meta: dict) -> streaming.ScanResult:
  """A body's scan result, or the error that rejects it."""
  if isinstance(result, Exception):
    raise result
  if result.sha256 != meta["body_sha256"]:
    raise UserError("body.safetensors does not match the sha256 in contribution.json "
                    "(changed or corrupted after upload)")
  if result.nonfinite:
    raise UserError(f"tensor {result.nonfinite} holds NaN or infinite values")
  return result


def validate(store, contributions, base, specs, workdir, threads, log,
             scanner=None) -> tuple[dict, list]:
  """Checks each contribution's body: ({id: Checked}, [rejections]).

  Bodies are read once, in parallel: ``threads`` groups of bodies with the same data layout,
  each group scanned a chunk of all its bodies at a time (:func:`streaming.scan_group`).
  ``scanner([(Contribution, BodyFile)])``, when given, measures the bodies that passed the
  header checks instead (a ScanResult or an exception per body, as the scan gives), or
  returns None to leave them to the scan.
  """
  opened, rejected = [], []
  limits = base.limits()

  def reject(c, error):
    entry = rejection(c.contributor_id, c.meta.get("dataset"), error)
    rejected.append(entry)
    log(f"rejected {printable(c.contributor_id)}: {printable(entry['reason'], _MAX_REASON)}")

  # Room for every body if the limits allow; else a body that fails its header checks is
  # closed at once, so only the bodies that pass must fit.
  make_room_for_files(len(contributions))
  for i, c in enumerate(contributions):  # downloads in this thread: one storage client
    try:
      make_room_for_files(1, len(contributions), len(contributions) - i)
      body = _open_body(store, c, workdir, limits)
    except LimitError:
      for _, body in opened:
        body.close()
      raise
    except Exception as e:  # pylint: disable=broad-except  (one contribution's problem)
      reject(c, e)
      continue
    problem = specs_difference(body.specs(), specs)
    if problem:
      body.close()
      reject(c, problem)
      continue
    opened.append((c, body))
  found = scanner(opened) if scanner is not None and opened else None
  results = dict(enumerate(found)) if found is not None else _scan(opened, specs, base, threads)
  checked = {}
  for i in sorted(range(len(opened)), key=lambda i: opened[i][0].contributor_id):
    c, body = opened[i]
    try:
      checked[c.contributor_id] = Checked(c, body, _checked_scan(results[i], c.meta))
    except Exception as e:  # pylint: disable=broad-except
      body.close()
      reject(c, e)
  return checked, rejected


def _scan(opened: list, specs: dict, base, threads: int) -> dict:
  """{index in ``opened``: ScanResult or the exception of its read} by scanning groups."""
  groups = streaming.layout_groups([body for _, body in opened], threads)
  results = {}
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(groups))) as pool:
    futures = [pool.submit(streaming.scan_group, [opened[i][1] for i in group], specs, base)
               for group in groups]
    for group, future in zip(groups, futures):
      try:
        results.update(zip(group, future.result()))
      except Exception as e:  # pylint: disable=broad-except  (a file that broke its group's scan)
        results.update((i, e) for i in group)
  return results


class Validations:
  """The contributions to the latest base validated so far, kept open for the fusion.

  The fuse program keeps one while it waits for the quorum and validates each contribution
  as it arrives, so that once the quorum is met only the fusion is left to do. A contribution
  is validated once; it is checked again only if its ``contribution.json`` changes.
  """

  def __init__(self, store: store_lib.Store, settings: Settings, log):
    self.store, self.settings, self.log = store, settings, log
    self.iteration = store.require_latest()
    self.manifest = store.manifest(self.iteration)
    self.base_sha = self.manifest["files"][store_lib.MODEL]["sha256"]
    # The base's sha256 is checked in the background while the bodies are read (see
    # base_checked), as are its own norms, the measure of the bounds on updates (fusion.trust).
    self.base_dir, check_base = store.base_dir_checked_later(self.iteration, store_lib.MODEL)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    self._base_check = pool.submit(check_base)
    self._staging = store_lib.staging_dir("validate")
    self.work = self._staging.name
    self.base = None
    try:
      self.keys = signing.load_keys(store)
      self.base = safetensors_io.BodyFile(os.path.join(self.base_dir, store_lib.MODEL))
      self.specs = self.base.specs()
    except BaseException:
      pool.shutdown(wait=False)
      if self.base is not None:
        self.base.close()
      self._staging.cleanup()
      self.base_checked()  # a corrupt base says so first
      raise
    self._base_squares = pool.submit(streaming.squared_norms, self.base, self.specs)
    pool.shutdown(wait=False)
    self.numel = {n: math.prod(shape) for n, (shape, _) in self.specs.items()}
    self._checked: dict[str, Checked] = {}
    self._failed: dict[str, tuple[dict, dict]] = {}  # id -> (contribution.json, rejection)

  def base_checked(self) -> None:
    """Waits for the check of the base's sha256: raises UserError when the base's file does
    not match its manifest. Nothing computed from the base may be written before it."""
    self._base_check.result()

  @property
  def base_squares(self) -> dict:
    """{floating tensor: the base's squared norm}."""
    return self._base_squares.result()

  def current(self, store: store_lib.Store) -> bool:
    """Whether this is still about the latest base of ``store``."""
    return store is self.store and store.require_latest() == self.iteration

  def check(self, contributions, log=None, scanner=None) -> tuple[dict, list]:
    """Validates those of ``contributions`` not seen yet: ({id: Checked}, [rejections]),
    both for all of ``contributions``. ``scanner``: see :func:`validate`; used only when
    none of ``contributions`` was seen before."""
    log = log or self.log
    new = []
    for c in contributions:
      cid = c.contributor_id
      known = self._checked.get(cid)
      if known is not None and known.contribution.meta != c.meta:
        known.body.close()
        del self._checked[cid]
      if cid in self._failed and self._failed[cid][0] != c.meta:
        del self._failed[cid]
      if cid not in self._checked and cid not in self._failed:
        new.append(c)
    if len(new) < len(contributions):
      scanner = None
    checked, rejected = validate(self.store, new, self.base, self.specs, self.work,
                                  self.settings.threads(), log, scanner)
    self._checked.update(checked)
    by_id = {r["id"]: r for r in rejected}
    for c in new:
      if c.contributor_id in by_id:
        self._failed[c.contributor_id] = (c.meta, by_id[c.contributor_id])
    ids = {c.contributor_id for c in contributions}
    return ({cid: v for cid, v in self._checked.items() if cid in ids},
            [r for cid, (_, r) in sorted(self._failed.items()) if cid in ids])

  def refresh(self) -> int:
    """Validates the complete contributions to the base that arrived since the last call:
    the number of valid ones so far."""
    found, _ = candidates(self.store, self.iteration, self.base_sha, lambda m: None, self.keys)
    return len(self.check(found)[0])

  def close(self) -> None:
    for c in self._checked.values():
      c.body.close()
    self._checked.clear()
    concurrent.futures.wait([self._base_squares, self._base_check])
    self.base.close()
    self._staging.cleanup()


def candidates(store, iteration: int, base_sha: str, log, keys=None) -> tuple[list, list]:
  """Complete contributions to ``iteration`` that claim the current base (and, where the
  store lists contributors' keys, are signed by them), and the rejections (unreadable
  contribution.json, stale base, signature) that need no body reading."""
  found, unreadable = store.contributions(iteration)
  rejected = []

  def reject(cid, dataset, reason):
    rejected.append(rejection(cid, dataset, reason))
    log(f"rejected {printable(cid)}: {printable(reason, _MAX_REASON)}")

  for r in unreadable:
    reject(r["id"], r.get("dataset"), r["reason"])
  fresh = []
  for c in sorted(found, key=lambda c: c.contributor_id):
    meta = c.meta
    if meta["base_iteration"] != iteration or meta["base_sha256"] != base_sha:
      reject(c.contributor_id, meta["dataset"],
             f"stale: trained from base {meta['base_iteration']} ({meta['base_sha256'][:12]}), "
             f"the current base is {iteration} ({base_sha[:12]})")
      continue
    problem = signing.problem(meta, keys)
    if problem:
      reject(c.contributor_id, meta["dataset"], problem)
      continue
    fresh.append(c)
  return fresh, rejected


def metrics(value) -> dict:
  """The numeric dev metrics of a contribution (untrusted: bounded and finite only)."""
  out = {}
  if isinstance(value, dict):
    for key in sorted(value)[:_MAX_METRICS]:
      v = value[key]
      if (isinstance(key, str) and len(key) <= 64 and isinstance(v, (int, float))
          and not isinstance(v, bool) and math.isfinite(v)):
        out[key] = v
  return out


def entry(checked: Checked, z: Optional[float], weight: Optional[float] = None,
          clip: Optional[dict] = None) -> dict:
  """A fused contribution as the plan and the manifest record it (``weight``: what it
  counts for in ``weighted``; ``clip``: {tensor: factor} when its update was clipped)."""
  meta = checked.contribution.meta
  out = {"id": checked.contribution.contributor_id, "dataset": meta["dataset"],
         "num_examples": meta["num_examples"], "sha256": checked.scan.sha256,
         "dev_metrics": metrics(meta.get("dev_metrics")),
         "update_norm": checked.norm,
         "update_z": z if z is not None and math.isfinite(z) else None}
  if weight is not None:
    out["weight"] = weight
  if clip:
    out["clip"] = {name: clip[name] for name in sorted(clip)}
  return out
