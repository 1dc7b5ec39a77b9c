"""The fusion job: validate the latest iteration's contributions, fuse them tensor by tensor,
publish the next base.

One fusion of base ``i`` into base ``i+1`` (after a rollback, into the first number past
every withdrawn base, with parent ``i``):

1. **Validate** every complete contribution to iteration ``i`` (each body is hashed and
   measured once, on every core): the size and schema of ``contribution.json``; the base
   iteration and sha256 it claims are base ``i``'s (stale work is rejected); its signature
   where the store lists keys; its size and sha256; the same tensor names, shapes and dtypes
   as the base; a well-formed safetensors file of the base's layout; every value finite. Then
   :mod:`.trust`: identical bodies count once (the earliest upload), updates beyond the norm
   bounds are rejected (or clipped), and with 3 or more contributions outliers and updates
   against the others' direction are rejected. Every rejection is printed, recorded with its
   reason, and the fusion goes on with the rest: whatever a contribution holds, it is that
   contribution's rejection. A fuser that waits for the quorum (``max_wait``, ``--watch``)
   validates each contribution as it arrives (:class:`Validations`), so that at the quorum
   only steps 2-4 are left. The base's own file is checked against its manifest's sha256
   meanwhile, in the background, and before anything is planned. The bodies read for the
   first time are fused while they are validated, and bodies validated earlier while the
   direction check reads them (:mod:`.speculative`): when the plan then fuses exactly those
   (the usual case), that fusion is step 3, and no body is read again.
2. **Plan**: the fuser that first creates ``fusion/<i+1>/plan.json`` (an exclusive create)
   fixes which contributions are fused, which are rejected, and how. Every other attempt at
   iteration ``i+1`` (a racing fuser, a rerun after a crash) fuses exactly that plan, so all
   of them write the same bytes. A plan made with other settings is an error: rerun with
   those settings, or delete the plan if its fuser is gone and nothing was published. A plan
   that can no longer be followed is replaced (compare-and-swap).
3. **Fuse**, streaming: tensor by tensor in name order, in chunks of
   :data:`CHUNK_ELEMENTS` elements for the element-wise methods (``ties`` and ``dare`` work
   on whole tensors), read with ``pread`` from the files validated in step 1, written by a
   chunk writer, optionally followed by a server optimizer step whose momentum buffer is
   stored in ``fusion/<i+1>/momentum.safetensors``. Memory stays at about a chunk per
   thread and contribution, whatever the number of contributions. The fused base is checked
   (finite, within ``max_fused_ratio`` of the parent's norm) and never published otherwise.
4. **Publish** with :meth:`Store.publish_base`: the files (the fused body's sha256 computed as
   it was written; on a local store on the same filesystem the staged file is synced and
   hard-linked into place rather than copied), then ``manifest.json``, then ``LATEST`` by
   compare-and-swap. A fuser that loses the race says so and stops.

The manifest records the fused contributions (id, dataset, examples, sha256, dev metrics,
update norm and z-score), the rejected ones with reasons, the method and its parameters,
the server optimizer and its state, the parent base and sha256 (and the code version). It
holds no time stamps, so the same inputs always publish the same bytes.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Callable, Optional

from absl import logging
import numpy as np

from cold_fusion_tf import store as store_lib
from cold_fusion_tf.errors import UserError
from cold_fusion_tf.fusion import plan as plan_lib
from cold_fusion_tf.fusion import speculative
from cold_fusion_tf.fusion import stream
from cold_fusion_tf.fusion import trust
from cold_fusion_tf.fusion import validation
from cold_fusion_tf.fusion.settings import Outcome, Settings
from cold_fusion_tf.fusion.validation import Validations
from cold_fusion_tf.store import layout
from cold_fusion_tf.store.untrusted import printable
from cold_fusion_tf.tensors import streaming


class _Job:
  """One fusion of base ``iteration`` into ``target`` (``iteration + 1`` but after a
  rollback), and the files it holds open."""

  def __init__(self, validations: Validations, settings: Settings, log, work: str):
    self.validations, self.settings, self.log, self.work = validations, settings, log, work
    self.store = validations.store
    self.iteration, self.manifest = validations.iteration, validations.manifest
    self.target = self.store.next_iteration(self.iteration)
    self.base_sha, self.base_dir = validations.base_sha, validations.base_dir
    self.base, self.specs = validations.base, validations.specs
    self.checked: dict[str, validation.Checked] = {}
    self.early: Optional[speculative.Fused] = None  # a fusion made before the plan
    self.reused = False
    self.previous_state = None
    self.hashes: dict[str, str] = {}
    self.valid = 0
    self.plan_name = layout.plan_name(self.target)
    self.plan_where = f"{self.store.uri}/{self.plan_name}"

  @functools.cached_property
  def bounds(self) -> trust.Limits:
    return trust.limits(self.validations.base_squares, self.validations.numel, self.settings)

  def close(self) -> None:
    """Closes what the job opened (the validated bodies belong to its Validations)."""
    if self.previous_state is not None:
      self.previous_state.close()

  def _validate(self, contributions) -> list[dict]:
    """Validates ``contributions``; those read for the first time are fused on the way, in
    case the plan fuses them all (:mod:`.speculative`)."""
    scanner = self._validate_and_fuse if speculative.possible(self.settings, self.specs) else None
    checked, failed = self.validations.check(contributions, self.log, scanner)
    self.checked.update(checked)
    return failed

  def _early_path(self) -> str:
    """Where the next early fusion goes (the previous one, not kept, is dropped)."""
    if self.early is not None and os.path.exists(self.early.path):
      os.remove(self.early.path)
    self.early = None
    return os.path.join(self.work, "early.safetensors")

  def _validate_and_fuse(self, opened: list) -> Optional[list]:
    results, self.early = speculative.validate_and_fuse(opened, self.base, self.specs,
                                                        self.settings, self._early_path())
    return results

  def _read_plan(self) -> tuple[Optional[dict], object, Optional[str]]:
    """(the plan or None, its version token, why it cannot be followed or None)."""
    raw, token = self.store.read_plan(self.target)
    if raw is None:
      return None, token, None
    try:
      plan = plan_lib.check_plan(layout.parse_json(raw, self.plan_where), self.plan_where,
                                 self.iteration, self.base_sha, self.target)
    except UserError as e:
      return None, token, str(e)
    return plan, token, None

  def _candidates(self, log):
    return validation.candidates(self.store, self.iteration, self.base_sha, log,
                                 self.validations.keys)

  def _follow(self, plan: dict) -> Optional[str]:
    """Validates the planned contributions: why the plan cannot be followed, or None."""
    wanted = {e["id"] for e in plan["fusion"]["contributions"]}
    self._validate([c for c in self._candidates(lambda m: None)[0]
                    if c.contributor_id in wanted])
    try:
      plan_lib.follow(plan, self.plan_where, self.checked, self.settings)
    except plan_lib.Unfollowable as e:
      return str(e)
    return None

  def plan(self, attempts: int = 3) -> tuple[Optional[dict], list[dict]]:
    """Validates, then makes the plan of base ``target`` or follows the one that exists:
    (the plan, or None when the quorum is not met; the rejections)."""
    plan, token, problem = self._read_plan()
    if plan is not None:
      problem = self._follow(plan)
      self.validations.base_checked()
      if problem is None:
        self.log(f"following the plan in {self.plan_where}: fusing "
                 f"{', '.join(sorted(e['id'] for e in plan['fusion']['contributions']))}")
        for r in plan["fusion"]["rejected"]:
          self.log(f"rejected {printable(r['id'])}: {printable(r['reason'], 600)}")
        return plan, plan["fusion"]["rejected"]
    if problem is not None:
      self.log(f"the plan in {self.plan_where} cannot be followed ({printable(problem, 300)}); "
               "planning again")
    candidates, rejected = self._candidates(self.log)
    rejected += self._validate(candidates)
    self.validations.base_checked()  # before anything measured against the base counts
    kept, dropped, scores, clips = trust.select(self.checked, self.settings, self.bounds,
                                                self._directions, self.log, self._gram)
    rejected = sorted(rejected + dropped, key=lambda r: (r["id"], r["reason"]))
    self.valid = len(kept)
    if len(kept) < self.settings.min_contributions:
      return None, rejected
    weights = trust.capped_weights(
        [self.checked[c].contribution.meta["num_examples"] for c in kept],
        self.settings.max_weight_ratio)
    new = {"format_version": store_lib.FORMAT_VERSION, "iteration": self.target,
           "parent": {"iteration": self.iteration, "sha256": self.base_sha},
           "fusion": {**self.settings.plan_fields(),
                      "contributions": [validation.entry(self.checked[c], scores.get(c), w,
                                                         clips.get(c))
                                        for c, w in zip(kept, weights)],
                      "rejected": rejected}}
    new = plan_lib.fit(new)
    if self.store.write_plan(self.target, new, None if problem is None else token):
      return new, rejected
    if attempts <= 1:
      raise UserError(f"{self.plan_where}: kept changing while planning; run again.")
    self.log(f"another fuser planned base {self.target} first; following its plan")
    return self.plan(attempts - 1)

  def _directions(self, ids: list[str], factors: dict) -> tuple:
    """The direction terms of ``ids`` (their updates scaled by ``factors``): from the early
    fusion of exactly those, or by fusing them now (kept if the check keeps them all)."""
    clips = {c: factors[c] for c in ids if factors.get(c)}
    if not speculative.possible(self.settings, self.specs):
      return streaming.direction_terms([self.checked[c].body for c in ids], self.specs,
                                       self.base, [clips.get(c, {}) for c in ids])
    if self.early is not None and self.early.terms is not None and \
        self.early.ids == tuple(ids) and not clips:
      return self.early.terms
    bodies = [stream.ClippedBody(self.checked[c].body, self.base, clips[c]) if c in clips
              else self.checked[c].body for c in ids]
    self.early, _ = speculative.fuse(self.base, [self.checked[c].contribution for c in ids],
                                     bodies, self.specs, self.settings, self._early_path(),
                                     clips)
    return self.early.terms

  def _gram(self, ids: list[str], factors: dict) -> np.ndarray:
    """The dot products of every pair of the updates of ``ids`` (scaled by ``factors``)."""
    return streaming.gram([self.checked[c].body for c in ids], self.specs, self.base,
                          [factors.get(c) or {} for c in ids])

  def build(self, plan: dict) -> tuple[str, dict]:
    """Fuses as planned into a staging directory: (its path, the manifest fields). Raises
    UserError, publishing nothing, when the fused base fails :func:`trust.check_fused`."""
    ids = plan_lib.follow(plan, self.plan_where, self.checked, self.settings)
    entries = {e["id"]: e for e in plan["fusion"]["contributions"]}
    out_dir = os.path.join(self.work, "base")
    os.makedirs(out_dir)
    fields = {"parent": plan["parent"], "fusion": dict(plan["fusion"])}
    state_path = previous_sha = None
    if self.settings.server_optimizer is not None:
      self.previous_state, previous_sha = stream.previous_state(
          self.store, self.iteration, self.manifest, self.specs, self.work, self.log)
      state_path = os.path.join(self.work, layout.STATE)
    counts = np.asarray([entries[cid].get("weight", entries[cid]["num_examples"])
                         for cid in ids], dtype=np.float64)
    clips = {cid: entries[cid]["clip"] for cid in ids if entries[cid].get("clip")}
    model_path = os.path.join(out_dir, store_lib.MODEL)
    if state_path is None and self.early is not None and self.early.matches(ids, counts, clips):
      os.replace(self.early.path, model_path)  # fused before the plan, exactly as planned
      model_sha, state_sha, check, self.reused = self.early.sha256, None, self.early.check, True
    else:
      self._early_path()
      bodies = [stream.ClippedBody(self.checked[cid].body, self.base, clips[cid])
                if cid in clips else self.checked[cid].body for cid in ids]
      check = {}
      model_sha, state_sha = stream.fuse_files(
          self.base, bodies, counts, self.specs, self.settings, model_path, state_path,
          self.previous_state, fsync=False, check=check)  # staged: the upload makes the copy
    try:
      trust.check_fused(check.get("squared_distance", 0.0), check.get("nonfinite"),
                        self.bounds.base_norm, self.settings)
    except UserError as e:
      self._mark_failed(plan, str(e))
      raise UserError(f"{e}. Rerun with other fusion settings, or withdraw a base with "
                      "`python -m cold_fusion_tf.rollback`.") from None
    self.hashes = {store_lib.MODEL: model_sha}
    # The base's other files (config, tokenizer), hashed as they are copied.
    self.store.copy_base(self.iteration, out_dir, skip=(store_lib.MODEL,))
    if state_path is not None:
      fields["fusion"]["server_optimizer"] = {
          **self.settings.server_optimizer, "previous_state_sha256": previous_sha,
          "state": {"name": layout.state_name(self.target),
                    "sha256": state_sha,
                    "size": os.path.getsize(state_path)}}
    return out_dir, fields

  def _mark_failed(self, plan: dict, reason: str) -> None:
    """Records in the plan that its fused base failed the check, so that the next attempt
    plans again (with the settings it is run with)."""
    raw, token = self.store.read_plan(self.target)
    if raw is not None and raw == layout.json_bytes(plan):
      self.store.write_plan(self.target, {**plan, "fused_check_failed": reason}, token)

  def publish(self, out_dir: str, fields: dict) -> None:
    """Uploads the server state, then the base (files, manifest, LATEST); may raise LostRace."""
    state = (fields["fusion"].get("server_optimizer") or {}).get("state")
    if state:
      self.store.put_state(self.target, os.path.join(self.work, layout.STATE))
    self.store.publish_base(self.target, out_dir, fields, known_sha256=self.hashes,
                            move=True, parent=self.iteration)


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
        message = (f"base {iteration}: {job.valid} valid contribution(s), fewer than the "
                   f"{settings.min_contributions} required; nothing published.")
        log(message)
        return Outcome(None, [], rejected, message, timings=timings)
      fused = plan["fusion"]["contributions"]
      tick = time.perf_counter()
      out_dir, fields = job.build(plan)
      timings["fuse"] = time.perf_counter() - tick
      timings["fused_before_plan"] = float(job.reused)
      tick = time.perf_counter()
      try:
        job.publish(out_dir, fields)
      except store_lib.LostRace as e:
        latest = store.latest()
        message = (f"base {job.target} was published by another fuser ({e}); nothing to do."
                   if latest == job.target else
                   f"LATEST moved to base {latest} while publishing base {job.target} ({e}); "
                   "nothing published: run again to fuse from there.")
        log(message)
        return Outcome(None, fused, rejected, message, lost_race=True, timings=timings)
      timings["publish"] = time.perf_counter() - tick
    finally:
      job.close()
      if own:
        validations.close()
  timings["total"] = time.perf_counter() - start
  target = job.target
  message = (f"published base {target}: {settings.method} of {len(fused)} "
             f"contribution(s) ({', '.join(e['id'] for e in fused)}), {len(rejected)} "
             f"rejected; validation {timings['validate']:.1f}s"
             f"{' (fused on the way)' if job.reused else ''}, fusion {timings['fuse']:.1f}s, "
             f"publishing {timings['publish']:.1f}s")
  log(message)
  return Outcome(target, fused, rejected, message, timings=timings)


def fuse_config(store: store_lib.Store, fusion_config,
                log: Callable[[str], None] = logging.info) -> Outcome:
  """:func:`fuse` with the settings of a ``config.fusion`` section."""
  return fuse(store, log=log, settings=Settings.from_config(fusion_config))
