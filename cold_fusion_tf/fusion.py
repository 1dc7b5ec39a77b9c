"""The fusion job: validate the latest iteration's contributions, fuse them tensor by tensor,
publish the next base.

One fusion of base ``i`` into base ``i+1``:

1. **Validate** every complete contribution to iteration ``i`` (each body is read once, in
   parallel threads): the schema of ``contribution.json``; the base iteration and sha256 it
   claims are base ``i``'s (stale work is rejected); its size and sha256; the same tensor
   names, shapes and dtypes as the base; a well-formed safetensors file (a truncated or
   corrupt file is rejected); every value finite. Then a body identical to an earlier one
   (same sha256, another contributor id) counts once, and, with 3 or more contributions, an
   update whose norm ``||body - base||`` is far above the others' (a robust z-score above
   ``max_update_z``, see :func:`fusion_methods.robust_z_scores`) is rejected. With fewer than
   3, z-scores cannot tell an outlier apart and this check is skipped. Every rejection is
   printed, recorded with its reason, and the fusion goes on with the rest. A fuser that
   waits for the quorum (``max_wait``, ``--watch``) validates each contribution as it
   arrives (:class:`Validations`), so that at the quorum only steps 2-4 are left.
2. **Plan**: the fuser that first creates ``fusion/<i+1>/plan.json`` (an exclusive create)
   fixes which contributions are fused, which are rejected, and how. Every other attempt at
   iteration ``i+1`` (a racing fuser, a rerun after a crash) fuses exactly that plan, so all
   of them write the same bytes. A plan made with other settings is an error: rerun with
   those settings, or delete the plan if its fuser is gone and nothing was published.
3. **Fuse**, streaming: tensor by tensor in name order, in chunks of
   :data:`CHUNK_ELEMENTS` elements for the element-wise methods (``ties`` and ``dare`` work
   on whole tensors), read with ``pread`` from the files validated in step 1, written by a
   chunk writer, optionally followed by a server optimizer step whose momentum buffer is
   stored in ``fusion/<i+1>/momentum.safetensors``. Memory stays at about a chunk per
   thread and contribution, whatever the number of contributions.
4. **Publish** with :meth:`Store.publish_base`: the files (the fused body's sha256 computed as
   it was written; on a local store on the same filesystem the staged file is synced and
   hard-linked into place rather than copied), then ``manifest.json``, then ``LATEST`` by
   compare-and-swap. A fuser that loses the race says so and stops.

The manifest records the fused contributions (id, dataset, examples, sha256, dev metrics,
update norm and z-score), the rejected ones with reasons, the method and its parameters,
the server optimizer and its state, the parent base and sha256 (and the code version). It
holds no time stamps, so the same inputs always publish the same bytes.

Test-only fault injection: when the environment variable ``COLD_FUSION_FAULT`` is set, the
fuser ends the process at once (``os._exit(FAULT_EXIT_CODE)``, no clean-up, like a kill) at a
named step, or pauses there: ``after_plan``, ``after_state``, ``after_files:<k>`` (after the
k-th file of the new base is uploaded), ``after_manifest`` (before ``LATEST`` moves), or
``sleep_before_publish:<seconds>``. The tests use it to show that a killed fusion, run
again, publishes the same bytes, and that racing fusers publish one base.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import math
import os
import shutil
import threading
import time
from typing import Callable, Iterator, Optional, Sequence

from absl import logging
import numpy as np

from cold_fusion_tf import fusion_io
from cold_fusion_tf import fusion_methods as fm
from cold_fusion_tf import paths
from cold_fusion_tf import store as store_lib
from cold_fusion_tf.errors import UserError

PLAN = "plan.json"
STATE = "momentum.safetensors"
CHUNK_ELEMENTS = 1 << 16
"""Elements per chunk for element-wise methods (small enough to stay in the CPU caches)."""
MEAN_CHUNK_ELEMENTS = 1 << 18
"""Elements per chunk for ``mean``, which holds two chunks per thread whatever N is (fewer,
larger reads: the fusion pass of 8 roberta-base bodies is about 30% faster than with
:data:`CHUNK_ELEMENTS`)."""
ELEMENTWISE = frozenset({"mean", "weighted", "trimmed_mean", "median", "task_arithmetic"})
"""Methods whose result at a coordinate depends only on that coordinate: fused in chunks."""
FAULT_ENV = "COLD_FUSION_FAULT"
FAULT_EXIT_CODE = 75
_MAX_REASON = 600
_MAX_METRICS = 32


# ----------------------------------------------------------------------------------------------
# Settings and results.


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a fusion job does; :meth:`from_config` reads them from ``config.fusion``."""

  method: str = "mean"
  params: dict = dataclasses.field(default_factory=dict)
  min_contributions: int = 1
  max_update_z: float = fm.ROBUST_Z_THRESHOLD
  server_optimizer: Optional[dict] = None  # {"lr", "momentum", "nesterov"} when enabled
  workers: int = 0
  max_wait: float = 0.0
  poll_seconds: float = 30.0
  watch_iterations: int = 0

  def __post_init__(self):
    fm.get_method(self.method)
    set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
    set_("params", fm.check_params(self.method, dict(self.params or {})))
    if self.server_optimizer is not None:
      set_("server_optimizer", fm.check_params(fm.SERVER_MOMENTUM, dict(self.server_optimizer)))
    for name, low, kind in (("min_contributions", 1, int), ("workers", 0, int),
                            ("watch_iterations", 0, int), ("max_update_z", 0, float),
                            ("max_wait", 0, float), ("poll_seconds", 0.001, float)):
      value = getattr(self, name)
      ok = isinstance(value, (int, float)) and not isinstance(value, bool)
      ok = ok and (kind is float or float(value).is_integer()) and math.isfinite(value)
      if not ok or value < low:
        raise UserError(f"config.fusion.{name}={value!r} is invalid: expected "
                        f"{'an integer' if kind is int else 'a number'} >= {low}.")
      set_(name, kind(value))

  @classmethod
  def from_config(cls, fusion) -> "Settings":
    """From a ``config.fusion`` ConfigDict (see :mod:`cold_fusion_tf.defaults`)."""
    server = fusion.get("server_optimizer") or {}
    server = dict(server)
    enabled = server.pop("enabled", False)
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: fusion[k] for k in fields if k in fusion and k != "server_optimizer"}
    values["params"] = dict(values.get("params") or {})
    return cls(server_optimizer=server if enabled else None, **values)

  def plan_fields(self) -> dict:
    """The settings a plan fixes (everything that changes what gets published)."""
    return {"method": self.method, "params": self.params, "max_update_z": self.max_update_z,
            "server_optimizer": self.server_optimizer}

  def threads(self) -> int:
    return self.workers or max(1, min(os.cpu_count() or 1, 8))


@dataclasses.dataclass
class Outcome:
  published: Optional[int]  # the new iteration, or None if nothing was published
  fused: list[dict]
  rejected: list[dict]
  message: str
  lost_race: bool = False   # another fuser published this iteration
  timings: dict = dataclasses.field(default_factory=dict)


def plan_name(iteration: int) -> str:
  return f"fusion/{paths.iteration_name(iteration)}/{PLAN}"


def state_name(iteration: int) -> str:
  return f"fusion/{paths.iteration_name(iteration)}/{STATE}"


def _json_bytes(obj) -> bytes:
  return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def _normalized(obj):
  """``obj`` as it reads back from JSON (tuples become lists, ...), for comparisons."""
  return json.loads(json.dumps(obj, sort_keys=True))


# ----------------------------------------------------------------------------------------------
# Validation.


@dataclasses.dataclass
class _Checked:
  contribution: store_lib.Contribution
  body: fusion_io.BodyFile
  scan: fusion_io.ScanResult

  @property
  def norm(self) -> float:
    return math.sqrt(self.scan.squared_distance)


def _rejection(cid: str, dataset, reason: str) -> dict:
  entry = {"id": str(cid)[:200], "reason": str(reason)[:_MAX_REASON]}
  if isinstance(dataset, str):
    entry["dataset"] = dataset[:200]
  return entry


def _specs_difference(got: dict, want: dict) -> Optional[str]:
  if got == want:
    return None
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  if missing or extra:
    return (f"tensor names do not match the base (missing {missing[:5]}, unexpected "
            f"{extra[:5]}); is it a body of the base's architecture?")
  name = next(n for n in sorted(want) if got[n] != want[n])
  return (f"tensor {name} is {got[name][1]}{list(got[name][0])}, the base has "
          f"{want[name][1]}{list(want[name][0])}")


def _open_body(store, contribution, workdir) -> fusion_io.BodyFile:
  """Fetches (remote stores) and opens a contribution's body, checking its size and header."""
  meta = contribution.meta
  path = store.fetch_body(contribution, workdir)
  size = meta.get("body_size")
  if isinstance(size, int) and not isinstance(size, bool) and os.path.getsize(path) != size:
    raise UserError(f"body.safetensors has {os.path.getsize(path)} bytes, contribution.json "
                    f"says {size} (truncated or changed after upload)")
  return fusion_io.BodyFile(path, source=f"{store.uri}/{contribution.body_name}")


def _checked_scan(result, meta: dict) -> fusion_io.ScanResult:
  """A body's scan result, or the UserError that rejects it."""
  if isinstance(result, UserError):
    raise result
  if result.sha256 != meta["body_sha256"]:
    raise UserError("body.safetensors does not match the sha256 in contribution.json "
                    "(changed or corrupted after upload)")
  if result.nonfinite:
    raise UserError(f"tensor {result.nonfinite} holds NaN or infinite values")
  return result


def _validate(store, contributions, base, specs, workdir, threads, log) -> tuple[dict, list]:
  """Checks each contribution's body: ({id: _Checked}, [rejections]).

  Bodies are read once, in parallel: ``threads`` groups of bodies with the same data layout,
  each group scanned a chunk of all its bodies at a time (:func:`fusion_io.scan_group`).
  """
  opened, rejected = [], []

  def reject(c, error):
    rejected.append(_rejection(c.contributor_id, c.meta.get("dataset"), error))
    log(f"rejected {c.contributor_id}: {error}")

  for c in contributions:  # downloads in this thread: one storage client, one thread
    try:
      body = _open_body(store, c, workdir)
    except UserError as e:
      reject(c, e)
      continue
    problem = _specs_difference(body.specs(), specs)
    if problem:
      body.close()
      reject(c, problem)
      continue
    opened.append((c, body))
  groups = fusion_io.layout_groups([body for _, body in opened], threads)
  results = {}
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(groups))) as pool:
    futures = [pool.submit(fusion_io.scan_group, [opened[i][1] for i in group], specs, base)
               for group in groups]
    for group, future in zip(groups, futures):
      results.update(zip(group, future.result()))
  checked = {}
  for i in sorted(range(len(opened)), key=lambda i: opened[i][0].contributor_id):
    c, body = opened[i]
    try:
      checked[c.contributor_id] = _Checked(c, body, _checked_scan(results[i], c.meta))
    except UserError as e:
      body.close()
      reject(c, e)
  return checked, rejected


class Validations:
  """The contributions to the latest base validated so far, kept open for the fusion.

  The fuse program keeps one while it waits for the quorum and validates each contribution
  as it arrives, so that once the quorum is met only the fusion is left to do. A contribution
  is validated once; it is checked again only if its ``contribution.json`` changes.
  """

  def __init__(self, store: store_lib.Store, settings: "Settings", log):
    self.store, self.settings, self.log = store, settings, log
    self.iteration = store.require_latest()
    self.manifest = store.manifest(self.iteration)
    self.base_sha = self.manifest["files"][store_lib.MODEL]["sha256"]
    self.base_dir = store.base_dir(self.iteration)
    self._staging = store_lib.staging_dir("validate")
    self.work = self._staging.name
    self.base = fusion_io.BodyFile(os.path.join(self.base_dir, store_lib.MODEL))
    self.specs = self.base.specs()
    self._checked: dict[str, _Checked] = {}
    self._failed: dict[str, tuple[dict, dict]] = {}  # id -> (contribution.json, rejection)

  def current(self, store: store_lib.Store) -> bool:
    """Whether this is still about the latest base of ``store``."""
    return store is self.store and store.require_latest() == self.iteration

  def check(self, contributions, log=None) -> tuple[dict, list]:
    """Validates those of ``contributions`` not seen yet: ({id: _Checked}, [rejections]),
    both for all of ``contributions``."""
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
    checked, rejected = _validate(self.store, new, self.base, self.specs, self.work,
                                  self.settings.threads(), log)
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
    candidates, _ = _candidates(self.store, self.iteration, self.base_sha, lambda m: None)
    return len(self.check(candidates)[0])

  def close(self) -> None:
    for c in self._checked.values():
      c.body.close()
    self._checked.clear()
    self.base.close()
    self._staging.cleanup()


def _candidates(store, iteration: int, base_sha: str, log) -> tuple[list, list]:
  """Complete contributions to ``iteration`` that claim the current base, and rejections
  (unreadable contribution.json, stale base) that need no body reading."""
  found, rejected = store.contributions(iteration)
  for r in rejected:
    log(f"rejected {r['id']}: {r['reason']}")
  rejected = [_rejection(r["id"], r.get("dataset"), r["reason"]) for r in rejected]
  fresh = []
  for c in sorted(found, key=lambda c: c.contributor_id):
    meta = c.meta
    if meta["base_iteration"] != iteration or meta["base_sha256"] != base_sha:
      reason = (f"stale: trained from base {meta['base_iteration']} "
                f"({meta['base_sha256'][:12]}), the current base is {iteration} "
                f"({base_sha[:12]})")
      rejected.append(_rejection(c.contributor_id, meta["dataset"], reason))
      log(f"rejected {c.contributor_id}: {reason}")
      continue
    fresh.append(c)
  return fresh, rejected


def _select(checked: dict, max_update_z: float, log) -> tuple[list, list, dict]:
  """Drops repeated bodies and outlier updates: (accepted ids, rejections, {id: z})."""
  rejected, first_by_sha, kept = [], {}, []
  for cid in sorted(checked):
    c = checked[cid]
    other = first_by_sha.setdefault(c.scan.sha256, cid)
    if other != cid:
      reason = f"the same body (sha256 {c.scan.sha256[:12]}) as contributor {other}; counted once"
      rejected.append(_rejection(cid, c.contribution.meta["dataset"], reason))
      log(f"rejected {cid}: {reason}")
      continue
    kept.append(cid)
  scores = {}
  if len(kept) >= 3 and max_update_z > 0:
    norms = np.array([checked[cid].norm for cid in kept])
    z = fm.robust_z_scores(norms, fm.MIN_RELATIVE_SPREAD)
    median = float(np.median(norms))
    scores = dict(zip(kept, (float(v) for v in z)))
    for cid, norm, score in zip(list(kept), norms, z):
      if score > max_update_z:
        reason = (f"update norm {norm:.4g} is far above the others' (median {median:.4g}; "
                  f"robust z-score {score:.3g} > {max_update_z:g})")
        rejected.append(_rejection(cid, checked[cid].contribution.meta["dataset"], reason))
        log(f"rejected {cid}: {reason}")
        kept.remove(cid)
  return kept, rejected, scores


def _metrics(value) -> dict:
  """The numeric dev metrics of a contribution (untrusted: bounded and finite only)."""
  out = {}
  if isinstance(value, dict):
    for key in sorted(value)[:_MAX_METRICS]:
      v = value[key]
      if (isinstance(key, str) and len(key) <= 64 and isinstance(v, (int, float))
          and not isinstance(v, bool) and math.isfinite(v)):
        out[key] = v
  return out


def _entry(checked: _Checked, z: Optional[float]) -> dict:
  meta = checked.contribution.meta
  return {"id": checked.contribution.contributor_id, "dataset": meta["dataset"],
          "num_examples": meta["num_examples"], "sha256": checked.scan.sha256,
          "dev_metrics": _metrics(meta.get("dev_metrics")),
          "update_norm": checked.norm,
          "update_z": z if z is not None and math.isfinite(z) else None}


# ----------------------------------------------------------------------------------------------
# The plan.


def _check_plan(plan: dict, where: str, iteration: int, base_sha: str) -> dict:
  """Schema of a plan for ``iteration + 1`` (untrusted store content)."""
  bad = lambda what: UserError(f"{where}: {what}; delete it to plan again.")  # noqa: E731
  if plan.get("format_version") != store_lib.FORMAT_VERSION:
    raise bad(f"format_version {plan.get('format_version')!r}")
  if plan.get("iteration") != iteration + 1:
    raise bad(f"iteration {plan.get('iteration')!r}, expected {iteration + 1}")
  if plan.get("parent") != {"iteration": iteration, "sha256": base_sha}:
    raise bad(f"made for another parent base ({plan.get('parent')!r})")
  fusion = plan.get("fusion")
  if not isinstance(fusion, dict):
    raise bad("no fusion section")
  entries, rejected = fusion.get("contributions"), fusion.get("rejected")
  if not isinstance(entries, list) or not entries or not isinstance(rejected, list):
    raise bad("contributions or rejected is not a list")
  seen = set()
  for e in entries:
    if not isinstance(e, dict):
      raise bad("a contribution entry is not an object")
    paths.check_path_part(e.get("id"), f"{where}: contribution id")
    store_lib.check_sha(e.get("sha256"), f"{where}: sha256 of {e.get('id')}")
    if e["id"] in seen:
      raise bad(f"contributor {e['id']} is listed twice")
    seen.add(e["id"])
  for r in rejected:
    if not (isinstance(r, dict) and isinstance(r.get("id"), str)
            and isinstance(r.get("reason"), str)):
      raise bad("a rejected entry is malformed")
  return plan


def _same_entry(mine: dict, planned: dict) -> bool:
  a, b = dict(mine), dict(planned)
  a.pop("update_z", None)
  b.pop("update_z", None)
  norm_a, norm_b = a.pop("update_norm", None), b.pop("update_norm", None)
  if not isinstance(norm_b, (int, float)) or not math.isclose(norm_a, norm_b, rel_tol=1e-6,
                                                                 abs_tol=1e-12):
    return False
  return _normalized(a) == _normalized(b)


def _follow(plan: dict, where: str, checked: dict, settings: Settings) -> list[str]:
  """Checks that the plan can be followed with these settings and bodies: the ids to fuse."""
  theirs = {k: plan["fusion"].get(k) for k in settings.plan_fields()}
  if _normalized(theirs) != _normalized(settings.plan_fields()):
    raise UserError(f"{where}: this iteration was planned with other fusion settings "
                    f"({json.dumps(theirs, sort_keys=True)}); rerun with those, or delete the "
                    "plan if the fuser that made it is gone.")
  ids = []
  for planned in plan["fusion"]["contributions"]:
    cid = planned["id"]
    mine = checked.get(cid)
    if mine is None or not _same_entry(_entry(mine, None), planned):
      raise UserError(f"{where}: contribution {cid} is no longer there as planned (missing, "
                      "changed or now invalid); delete the plan to plan again.")
    ids.append(cid)
  return ids


# ----------------------------------------------------------------------------------------------
# The fusion pass.


class _Chunks(Sequence):
  """The contributions' versions of one chunk of one tensor, read on access."""

  def __init__(self, bodies, name, start, count, shape):
    self.bodies, self.name, self.start, self.count, self.shape = bodies, name, start, count, shape

  def __len__(self):
    return len(self.bodies)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    return self.bodies[index].read(self.name, self.start, self.count).reshape(self.shape)


_buffers = threading.local()


def _mean_chunk(bodies, name: str, start: int, count: int, dtype) -> np.ndarray:
  """:func:`fusion_methods.mean` of one chunk, bit for bit, in two buffers per thread."""
  held = getattr(_buffers, "mean", None)
  if held is None or held[0].size < count or held[0].dtype != dtype:
    held = _buffers.mean = (np.empty(max(count, MEAN_CHUNK_ELEMENTS), dtype=dtype),
                            np.empty(max(count, MEAN_CHUNK_ELEMENTS), dtype=np.float64))
  buffer, total = held[0][:count], held[1][:count]
  bodies[0].read(name, start, count, out=buffer)
  np.add(buffer, 0.0, out=total, dtype=np.float64)  # 0 + x, as fm.mean (turns -0 into +0)
  for body in bodies[1:]:
    body.read(name, start, count, out=buffer)
    np.add(total, buffer, out=total)
  total /= len(bodies)
  return total.astype(dtype)


def _tasks(specs: dict, method: str) -> Iterator[tuple[str, int, int]]:
  for name in sorted(specs):
    size = int(np.prod(specs[name][0], dtype=np.int64))
    step = CHUNK_ELEMENTS if method in ELEMENTWISE or specs[name][1] not in \
        fusion_io.FLOAT_CODES else max(size, 1)
    if method == "mean":
      step = MEAN_CHUNK_ELEMENTS
    for start in range(0, size, step):
      yield name, start, min(step, size - start)


def _ordered(pool, fn, items, window: int) -> Iterator:
  """``map(fn, items)`` on a thread pool, in order, with at most ``window`` items in flight."""
  pending = collections.deque()
  try:
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) >= window:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()
  finally:
    for future in pending:
      future.cancel()


def fuse_files(base: fusion_io.BodyFile, bodies: list, counts: np.ndarray, specs: dict,
               settings: Settings, out_path: str, state_path: Optional[str] = None,
               previous_state: Optional[fusion_io.BodyFile] = None,
               fsync: bool = True) -> tuple[str, Optional[str]]:
  """Writes the fusion of ``bodies`` (and the new server momentum buffer) tensor by tensor:
  (the sha256 of the fused file, of the momentum buffer file or None).

  Floating tensors are fused with ``settings.method``; others are copied from the base.
  Element-wise methods work in chunks of :data:`CHUNK_ELEMENTS` (``mean``:
  :data:`MEAN_CHUNK_ELEMENTS`) on ``settings.threads()``
  threads; ``ties`` and ``dare`` on whole tensors, one at a time. ``fsync=False`` for files
  that are only staged for an upload.
  """
  fn = fm.get_method(settings.method)
  server = settings.server_optimizer
  fast_mean = settings.method == "mean"
  state_specs = {n: (shape, "F64" if code == "F64" else "F32") for n, (shape, code) in
                 specs.items() if code in fusion_io.FLOAT_CODES}

  def compute(task):
    name, start, count = task
    shape, code = specs[name]
    if code not in fusion_io.FLOAT_CODES:
      return name, base.read(name, start, count), None
    dtype = fusion_io.numpy_dtype(code)
    whole = settings.method not in ELEMENTWISE
    chunk_shape = shape if whole else (count,)
    base_chunk = None
    if fast_mean and code in ("F16", "F32", "F64"):
      fused = _mean_chunk(bodies, name, start, count, dtype)
    else:
      base_chunk = base.read(name, start, count).reshape(chunk_shape)
      fused = fn(base_chunk, _Chunks(bodies, name, start, count, chunk_shape), counts,
                 name=name, **settings.params)
    fused = fused.reshape(-1)
    if server is None:
      return name, fused, None
    if base_chunk is None:
      base_chunk = base.read(name, start, count)
    base_chunk = base_chunk.reshape(-1)
    previous = previous_state.read(name, start, count) if previous_state else None
    return (name,) + fm.server_momentum_step(base_chunk, fused.astype(np.float64) - base_chunk,
                                             previous, **server)

  threads = settings.threads() if settings.method in ELEMENTWISE else 1
  writer = fusion_io.ChunkWriter(out_path, specs, fsync)
  state_writer = fusion_io.ChunkWriter(state_path, state_specs, fsync) if server else None
  try:
    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
      for name, fused, buffer in _ordered(pool, compute, _tasks(specs, settings.method),
                                          2 * threads):
        writer.write(name, fused)
        if state_writer is not None and buffer is not None:
          state_writer.write(name, buffer)
    writer.close()
    if state_writer is not None:
      state_writer.close()
    return writer.sha256, (state_writer.sha256 if state_writer is not None else None)
  except BaseException:
    writer.abort()
    if state_writer is not None:
      state_writer.abort()
    raise


def _previous_state(store, iteration: int, manifest: dict, specs: dict, workdir: str, log):
  """The server momentum buffer saved with base ``iteration``: (BodyFile, sha256) or None."""
  info = (manifest.get("fusion") or {}).get("server_optimizer") or {}
  state = info.get("state") if isinstance(info, dict) else None
  if not state:
    log(f"server optimizer: no momentum buffer stored with base {iteration}; starting from zero")
    return None, None
  name = state_name(iteration)
  where = f"{store.uri}/{name}"
  if not isinstance(state, dict) or state.get("name") != name:
    raise UserError(f"{store.uri}: the manifest of base {iteration} names the momentum buffer "
                    f"{state!r}; expected {name}.")
  sha = store_lib.check_sha(state.get("sha256"), f"{where}: sha256")
  path = store.storage.local_path(name)
  if path is None:
    path = os.path.join(workdir, "previous_" + STATE)
    try:
      store.storage.download(name, path)
    except FileNotFoundError:
      path = None
  if path is None or not os.path.exists(path):
    raise UserError(f"{where}: missing, but the manifest of base {iteration} lists it; restore "
                    "it, or disable config.fusion.server_optimizer to start from zero.")
  body = fusion_io.BodyFile(path, source=where)
  want = {n: (shape, "F64" if code == "F64" else "F32") for n, (shape, code) in specs.items()
          if code in fusion_io.FLOAT_CODES}
  try:
    problem = _specs_difference(body.specs(), want)
    if problem:
      raise UserError(f"{where}: {problem}")
    result = fusion_io.scan(body, want)
    if result.sha256 != sha:
      raise UserError(f"{where}: sha256 does not match the manifest of base {iteration}.")
    if result.nonfinite:
      raise UserError(f"{where}: tensor {result.nonfinite} holds NaN or infinite values.")
  except BaseException:
    body.close()
    raise
  return body, sha


# ----------------------------------------------------------------------------------------------
# Fault injection (tests only; see the module docstring).


def _fault(point: str) -> None:
  spec = os.environ.get(FAULT_ENV, "")
  name, _, arg = spec.partition(":")
  if name != point:
    return
  if point.startswith("sleep_"):
    time.sleep(float(arg))
    return
  print(f"{FAULT_ENV}: ending the process at {spec}", flush=True)
  os._exit(FAULT_EXIT_CODE)  # pylint: disable=protected-access


class _FaultyStorage:
  """Forwards to a storage backend; ends the process after the k-th base file upload or
  right after the manifest is written, as ``COLD_FUSION_FAULT`` asks."""

  def __init__(self, inner):
    self._inner, self._uploads = inner, 0
    self._spec = os.environ.get(FAULT_ENV, "")

  def __getattr__(self, name):
    return getattr(self._inner, name)

  def upload(self, local_path, name, move=False):
    self._inner.upload(local_path, name, move=move)
    self._uploads += name.startswith("bases/")
    if self._spec == f"after_files:{self._uploads}":
      _fault("after_files")

  def write_bytes(self, name, data):
    self._inner.write_bytes(name, data)
    if name.endswith("/" + store_lib.MANIFEST):
      _fault("after_manifest")


# ----------------------------------------------------------------------------------------------
# The job.


class _Job:
  """One fusion of base ``iteration`` into ``iteration + 1``, and the files it holds open."""

  def __init__(self, validations: Validations, settings: Settings, log, work: str):
    self.validations, self.settings, self.log, self.work = validations, settings, log, work
    self.store = validations.store
    self.iteration, self.manifest = validations.iteration, validations.manifest
    self.base_sha, self.base_dir = validations.base_sha, validations.base_dir
    self.base, self.specs = validations.base, validations.specs
    self.checked: dict[str, _Checked] = {}
    self.previous_state = None
    self.hashes: dict[str, str] = {}
    self.valid = 0
    self.plan_where = f"{self.store.uri}/{plan_name(self.iteration + 1)}"

  def close(self) -> None:
    """Closes what the job opened (the validated bodies belong to its Validations)."""
    if self.previous_state is not None:
      self.previous_state.close()

  def _validate(self, contributions) -> list[dict]:
    checked, failed = self.validations.check(contributions, self.log)
    self.checked.update(checked)
    return failed

  def _read_plan(self) -> Optional[dict]:
    plan = self.store.read_json(plan_name(self.iteration + 1))
    return None if plan is None else _check_plan(plan, self.plan_where, self.iteration,
                                                 self.base_sha)

  def plan(self) -> tuple[Optional[dict], list[dict]]:
    """Validates, then makes the plan of iteration ``i+1`` or follows the one that exists:
    (the plan, or None when the quorum is not met; the rejections)."""
    plan = self._read_plan()
    quiet = lambda message: None  # noqa: E731
    candidates, rejected = _candidates(self.store, self.iteration, self.base_sha,
                                       quiet if plan else self.log)
    if plan is not None:
      wanted = {e["id"] for e in plan["fusion"]["contributions"]}
      self.log(f"following the plan in {self.plan_where}: fusing {', '.join(sorted(wanted))}")
      for r in plan["fusion"]["rejected"]:
        self.log(f"rejected {r['id']}: {r['reason']}")
      self._validate([c for c in candidates if c.contributor_id in wanted])
      return plan, plan["fusion"]["rejected"]
    rejected += self._validate(candidates)
    kept, dropped, scores = _select(self.checked, self.settings.max_update_z, self.log)
    rejected = sorted(rejected + dropped, key=lambda r: (r["id"], r["reason"]))
    self.valid = len(kept)
    if len(kept) < self.settings.min_contributions:
      return None, rejected
    plan = {"format_version": store_lib.FORMAT_VERSION, "iteration": self.iteration + 1,
            "parent": {"iteration": self.iteration, "sha256": self.base_sha},
            "fusion": {**self.settings.plan_fields(),
                       "contributions": [_entry(self.checked[c], scores.get(c)) for c in kept],
                       "rejected": rejected}}
    if self.store.storage.create_exclusive(plan_name(self.iteration + 1), _json_bytes(plan)):
      _fault("after_plan")
      return plan, rejected
    plan = self._read_plan()  # another fuser planned first: follow it
    self.log(f"another fuser planned iteration {self.iteration + 1} first; following its plan")
    wanted = {e["id"] for e in plan["fusion"]["contributions"]}
    self._validate([c for c in _candidates(self.store, self.iteration, self.base_sha, quiet)[0]
                    if c.contributor_id in wanted and c.contributor_id not in self.checked])
    return plan, plan["fusion"]["rejected"]

  def build(self, plan: dict) -> tuple[str, dict]:
    """Fuses as planned into a staging directory: (its path, the manifest fields)."""
    ids = _follow(plan, self.plan_where, self.checked, self.settings)
    out_dir = os.path.join(self.work, "base")
    os.makedirs(out_dir)
    fields = {"parent": plan["parent"], "fusion": dict(plan["fusion"])}
    state_path = previous_sha = None
    if self.settings.server_optimizer is not None:
      self.previous_state, previous_sha = _previous_state(
          self.store, self.iteration, self.manifest, self.specs, self.work, self.log)
      state_path = os.path.join(self.work, STATE)
    counts = np.asarray([self.checked[cid].contribution.meta["num_examples"] for cid in ids],
                        dtype=np.float64)
    model_sha, state_sha = fuse_files(
        self.base, [self.checked[cid].body for cid in ids], counts, self.specs, self.settings,
        os.path.join(out_dir, store_lib.MODEL), state_path, self.previous_state,
        fsync=False)  # staged: the upload makes the stored copy
    self.hashes = {store_lib.MODEL: model_sha}
    for name in sorted(self.manifest["files"]):
      if name != store_lib.MODEL:
        shutil.copyfile(os.path.join(self.base_dir, name), os.path.join(out_dir, name))
    if state_path is not None:
      fields["fusion"]["server_optimizer"] = {
          **self.settings.server_optimizer, "previous_state_sha256": previous_sha,
          "state": {"name": state_name(self.iteration + 1),
                    "sha256": state_sha,
                    "size": os.path.getsize(state_path)}}
    return out_dir, fields

  def publish(self, out_dir: str, fields: dict) -> None:
    """Uploads the server state, then the base (files, manifest, LATEST); may raise LostRace."""
    state = (fields["fusion"].get("server_optimizer") or {}).get("state")
    if state:
      self.store.storage.upload(os.path.join(self.work, STATE), state["name"], move=True)
      _fault("after_state")
    _fault("sleep_before_publish")
    inner = self.store.storage
    if os.environ.get(FAULT_ENV):
      self.store.storage = _FaultyStorage(inner)
    try:
      self.store.publish_base(self.iteration + 1, out_dir, fields, known_sha256=self.hashes,
                              move=True)
    finally:
      self.store.storage = inner


def fuse(store: store_lib.Store, method: str = "mean", params: Optional[dict] = None,
         min_contributions: int = 1, log: Callable[[str], None] = logging.info, *,
         settings: Optional[Settings] = None,
         validations: Optional[Validations] = None) -> Outcome:
  """Fuses the contributions to the latest base and publishes the next one.

  ``settings`` (all options) wins over ``method``, ``params`` and ``min_contributions``.
  ``validations``: contributions validated earlier (by the caller, who closes it), reused
  when it is about the latest base. Returns an Outcome; nothing is published when fewer than
  ``min_contributions`` pass validation (and no plan exists yet), or when another fuser
  publishes first.
  """
  if settings is None:
    settings = Settings(method=method, params=dict(params or {}),
                        min_contributions=min_contributions)
  timings, start = {}, time.perf_counter()
  own = validations is None or not validations.current(store)
  if own:
    validations = Validations(store, settings, log)
  with store_lib.staging_dir("fuse") as work:
    job = _Job(validations, settings, log, work)
    try:
      plan, rejected = job.plan()
      timings["validate"] = time.perf_counter() - start
      iteration = job.iteration
      if plan is None:
        message = (f"iteration {iteration}: {job.valid} valid contribution(s), fewer than the "
                   f"{settings.min_contributions} required; nothing published.")
        log(message)
        return Outcome(None, [], rejected, message, timings=timings)
      fused = plan["fusion"]["contributions"]
      tick = time.perf_counter()
      out_dir, fields = job.build(plan)
      timings["fuse"] = time.perf_counter() - tick
      tick = time.perf_counter()
      try:
        job.publish(out_dir, fields)
      except store_lib.LostRace as e:
        message = f"iteration {iteration + 1} was published by another fuser ({e}); nothing to do."
        log(message)
        return Outcome(None, fused, rejected, message, lost_race=True, timings=timings)
      timings["publish"] = time.perf_counter() - tick
    finally:
      job.close()
      if own:
        validations.close()
  timings["total"] = time.perf_counter() - start
  message = (f"published base {iteration + 1}: {settings.method} of {len(fused)} "
             f"contribution(s) ({', '.join(e['id'] for e in fused)}), {len(rejected)} "
             f"rejected; validation {timings['validate']:.1f}s, fusion {timings['fuse']:.1f}s, "
             f"publishing {timings['publish']:.1f}s")
  log(message)
  return Outcome(iteration + 1, fused, rejected, message, timings=timings)


def fuse_config(store: store_lib.Store, fusion_config,
                log: Callable[[str], None] = logging.info) -> Outcome:
  """:func:`fuse` with the settings of a ``config.fusion`` section."""
  return fuse(store, log=log, settings=Settings.from_config(fusion_config))


def _pending(store, iteration: int, base_sha: str) -> tuple:
  """Cheap: the (id, body sha256) of complete contributions claiming the current base."""
  found, _ = store.contributions(iteration)
  return tuple(sorted((c.contributor_id, c.meta["body_sha256"]) for c in found
                      if c.meta["base_iteration"] == iteration
                      and c.meta["base_sha256"] == base_sha))


def run(store: store_lib.Store, settings: Settings, watch: bool = False,
        log: Callable[[str], None] = logging.info, sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic) -> int:
  """The fuse program: returns its exit status (0: published, 1: no quorum in time).

  Without ``watch``: one fusion now; with ``settings.max_wait > 0`` it first polls the
  store every ``poll_seconds`` until ``min_contributions`` contributions are there or
  ``max_wait`` seconds have passed. With ``watch``: the same, iteration after iteration,
  until ``watch_iterations`` bases are published (0: forever); the deadline restarts with
  each iteration. Reaching a deadline with fewer than the quorum publishes nothing and
  returns 1.
  """
  advanced = 0
  while True:
    iteration = store.require_latest()
    base_sha = store.base_sha256(iteration)
    if watch and settings.max_wait == 0:
      deadline = math.inf
    elif watch or settings.max_wait > 0:
      deadline = clock() + settings.max_wait
    else:
      deadline = None  # one attempt, now
    tried, reported, validations, validated = None, None, None, None
    try:
      while True:
        if store.require_latest() != iteration:
          log(f"base {iteration + 1} was published by another fuser")
          break
        pending = _pending(store, iteration, base_sha)
        planned = store.storage.exists(plan_name(iteration + 1))
        if deadline is not None and pending and not planned and pending != validated:
          # Validate contributions as they arrive: at the quorum only the fusion is left.
          if validations is None:
            validations = Validations(store, settings, log)
          valid, validated = validations.refresh(), pending
        if deadline is None or ((len(pending) >= settings.min_contributions or planned)
                                and pending != tried):
          outcome = fuse(store, log=log, settings=settings, validations=validations)
          if outcome.published is not None or outcome.lost_race:
            break
          if deadline is None:
            return 1
          tried = pending
        now = clock()
        if now >= deadline:
          log(f"waited {settings.max_wait:g}s for contributions to iteration {iteration}: "
              f"{len(pending)} there, {settings.min_contributions} required; nothing "
              "published.")
          return 1
        if reported != pending:
          left = "" if math.isinf(deadline) else f", giving up in {deadline - now:.0f}s"
          checked = f" ({valid} validated)" if validations is not None and pending else ""
          log(f"iteration {iteration}: {len(pending)}{checked} of "
              f"{settings.min_contributions} required contribution(s); checking every "
              f"{settings.poll_seconds:g}s{left}")
          reported = pending
        sleep(min(settings.poll_seconds, deadline - now))
    finally:
      if validations is not None:
        validations.close()
    advanced += 1
    if not watch or advanced == settings.watch_iterations:
      return 0
