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
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Callable, Optional

from absl import logging
import numpy as np

from cold_fusion_tf import store as store_lib
from cold_fusion_tf.fusion import plan as plan_lib
from cold_fusion_tf.fusion import stream
from cold_fusion_tf.fusion import validation
from cold_fusion_tf.fusion.settings import Outcome, Settings
from cold_fusion_tf.fusion.validation import Validations
from cold_fusion_tf.store import layout


class _Job:
  """One fusion of base ``iteration`` into ``iteration + 1``, and the files it holds open."""

  def __init__(self, validations: Validations, settings: Settings, log, work: str):
    self.validations, self.settings, self.log, self.work = validations, settings, log, work
    self.store = validations.store
    self.iteration, self.manifest = validations.iteration, validations.manifest
    self.base_sha, self.base_dir = validations.base_sha, validations.base_dir
    self.base, self.specs = validations.base, validations.specs
    self.checked: dict[str, validation.Checked] = {}
    self.previous_state = None
    self.hashes: dict[str, str] = {}
    self.valid = 0
    self.plan_where = f"{self.store.uri}/{layout.plan_name(self.iteration + 1)}"

  def close(self) -> None:
    """Closes what the job opened (the validated bodies belong to its Validations)."""
    if self.previous_state is not None:
      self.previous_state.close()

  def _validate(self, contributions) -> list[dict]:
    checked, failed = self.validations.check(contributions, self.log)
    self.checked.update(checked)
    return failed

  def _read_plan(self) -> Optional[dict]:
    plan = self.store.read_json(layout.plan_name(self.iteration + 1))
    return None if plan is None else plan_lib.check_plan(plan, self.plan_where, self.iteration,
                                                 self.base_sha)

  def plan(self) -> tuple[Optional[dict], list[dict]]:
    """Validates, then makes the plan of iteration ``i+1`` or follows the one that exists:
    (the plan, or None when the quorum is not met; the rejections)."""
    plan = self._read_plan()
    quiet = lambda message: None  # noqa: E731
    candidates, rejected = validation.candidates(self.store, self.iteration, self.base_sha,
                                       quiet if plan else self.log)
    if plan is not None:
      wanted = {e["id"] for e in plan["fusion"]["contributions"]}
      self.log(f"following the plan in {self.plan_where}: fusing {', '.join(sorted(wanted))}")
      for r in plan["fusion"]["rejected"]:
        self.log(f"rejected {r['id']}: {r['reason']}")
      self._validate([c for c in candidates if c.contributor_id in wanted])
      return plan, plan["fusion"]["rejected"]
    rejected += self._validate(candidates)
    kept, dropped, scores = validation.select(self.checked, self.settings.max_update_z, self.log)
    rejected = sorted(rejected + dropped, key=lambda r: (r["id"], r["reason"]))
    self.valid = len(kept)
    if len(kept) < self.settings.min_contributions:
      return None, rejected
    plan = {"format_version": store_lib.FORMAT_VERSION, "iteration": self.iteration + 1,
            "parent": {"iteration": self.iteration, "sha256": self.base_sha},
            "fusion": {**self.settings.plan_fields(),
                       "contributions": [validation.entry(self.checked[c], scores.get(c)) for c in kept],
                       "rejected": rejected}}
    if self.store.storage.create_exclusive(layout.plan_name(self.iteration + 1), layout.json_bytes(plan)):
      return plan, rejected
    plan = self._read_plan()  # another fuser planned first: follow it
    self.log(f"another fuser planned iteration {self.iteration + 1} first; following its plan")
    wanted = {e["id"] for e in plan["fusion"]["contributions"]}
    self._validate([c for c in validation.candidates(self.store, self.iteration, self.base_sha, quiet)[0]
                    if c.contributor_id in wanted and c.contributor_id not in self.checked])
    return plan, plan["fusion"]["rejected"]

  def build(self, plan: dict) -> tuple[str, dict]:
    """Fuses as planned into a staging directory: (its path, the manifest fields)."""
    ids = plan_lib.follow(plan, self.plan_where, self.checked, self.settings)
    out_dir = os.path.join(self.work, "base")
    os.makedirs(out_dir)
    fields = {"parent": plan["parent"], "fusion": dict(plan["fusion"])}
    state_path = previous_sha = None
    if self.settings.server_optimizer is not None:
      self.previous_state, previous_sha = stream.previous_state(
          self.store, self.iteration, self.manifest, self.specs, self.work, self.log)
      state_path = os.path.join(self.work, layout.STATE)
    counts = np.asarray([self.checked[cid].contribution.meta["num_examples"] for cid in ids],
                        dtype=np.float64)
    model_sha, state_sha = stream.fuse_files(
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
          "state": {"name": layout.state_name(self.iteration + 1),
                    "sha256": state_sha,
                    "size": os.path.getsize(state_path)}}
    return out_dir, fields

  def publish(self, out_dir: str, fields: dict) -> None:
    """Uploads the server state, then the base (files, manifest, LATEST); may raise LostRace."""
    state = (fields["fusion"].get("server_optimizer") or {}).get("state")
    if state:
      self.store.storage.upload(os.path.join(self.work, layout.STATE), state["name"], move=True)
    self.store.publish_base(self.iteration + 1, out_dir, fields, known_sha256=self.hashes,
                            move=True)


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
