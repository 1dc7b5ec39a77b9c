"""The fusion job: validate the latest iteration's contributions, fuse them tensor by tensor,
publish the next base.

Memory stays at about one tensor per contribution being read (short-lived memory maps) plus
one output tensor, whatever the number of contributions; the output is written by a
streaming safetensors writer, so the same inputs always give the same bytes.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Callable, Optional, Sequence

from absl import logging
import numpy as np

from cold_fusion_tf import fusion_methods
from cold_fusion_tf import store as store_lib
from cold_fusion_tf import weights
from cold_fusion_tf.errors import UserError


@dataclasses.dataclass
class Outcome:
  published: Optional[int]  # the new iteration, or None if nothing was published
  fused: list[dict]
  rejected: list[dict]
  message: str


class _Bodies(Sequence):
  """The N contributions' versions of one tensor, mapped on access and released after."""

  def __init__(self, files: list[weights.TensorFile], name: str):
    self.files, self.name = files, name

  def __len__(self):
    return len(self.files)

  def __getitem__(self, index):
    return self.files[index].tensor(self.name)


def validate_contribution(store: store_lib.Store, contribution: store_lib.Contribution,
                          iteration: int, base_sha256: str, specs, workdir: str) -> str:
  """Checks one contribution against the current base; returns its local body path.

  Stale base, wrong body sha256, truncated or malformed file, other names/shapes/dtypes,
  non-finite values: each raises UserError with the reason.
  """
  meta = contribution.meta
  if meta["base_iteration"] != iteration or meta["base_sha256"] != base_sha256:
    raise UserError(f"stale: trained from base {meta['base_iteration']} "
                    f"({meta['base_sha256'][:12]}), the current base is {iteration} "
                    f"({base_sha256[:12]})")
  path = store.fetch_body(contribution, workdir)
  if weights.sha256_file(path) != meta["body_sha256"]:
    raise UserError("body.safetensors does not match the sha256 in contribution.json "
                    "(changed or corrupted after upload)")
  weights.check_file_against_specs(path, specs, "body.safetensors")
  tensors = weights.TensorFile(path)
  for name in specs:
    if not np.all(np.isfinite(tensors.tensor(name))):
      raise UserError(f"tensor {name} holds NaN or infinite values")
  return path


def fuse(store: store_lib.Store, method: str = "mean", params: Optional[dict] = None,
         min_contributions: int = 1, log: Callable[[str], None] = logging.info) -> Outcome:
  """Fuses the contributions to the latest base and publishes the next one.

  Returns an Outcome; nothing is published when fewer than ``min_contributions`` pass
  validation, or when another fuser publishes first.
  """
  fn = fusion_methods.get_method(method)
  params = fusion_methods.check_params(method, params or {})
  iteration = store.require_latest()
  base_dir = store.base_dir(iteration)
  base_sha = store.base_sha256(iteration)
  base_file = weights.TensorFile(os.path.join(base_dir, store_lib.MODEL))
  specs = base_file.specs()
  contributions, rejected = store.contributions(iteration)
  for r in rejected:
    log(f"rejected {r['id']}: {r['reason']}")
  with store_lib.staging_dir("fuse") as work:
    accepted = []
    for c in sorted(contributions, key=lambda c: c.contributor_id):
      try:
        path = validate_contribution(store, c, iteration, base_sha, specs, work)
      except UserError as e:
        rejected.append({"id": c.contributor_id, "dataset": c.meta.get("dataset"),
                         "reason": str(e)})
        log(f"rejected {c.contributor_id}: {e}")
        continue
      accepted.append((c, path))
    if len(accepted) < max(1, min_contributions):
      message = (f"iteration {iteration}: {len(accepted)} valid contribution(s), fewer than "
                 f"the {max(1, min_contributions)} required; nothing published.")
      log(message)
      return Outcome(None, [], rejected, message)
    start = time.time()
    out_dir = os.path.join(work, "base")
    os.makedirs(out_dir)
    files = [weights.TensorFile(p) for _, p in accepted]
    counts = np.asarray([c.meta["num_examples"] for c, _ in accepted], dtype=np.float64)

    def fused_tensors():
      for name in sorted(specs):
        yield name, fn(base_file.tensor(name), _Bodies(files, name), counts, name=name, **params)

    weights.write_streaming(os.path.join(out_dir, store_lib.MODEL), specs, fused_tensors())
    for name in os.listdir(base_dir):
      if name not in (store_lib.MODEL, store_lib.MANIFEST) and not name.endswith(".partial"):
        shutil.copyfile(os.path.join(base_dir, name), os.path.join(out_dir, name))
    fused = [{"id": c.contributor_id, "dataset": c.meta["dataset"],
              "num_examples": c.meta["num_examples"], "sha256": c.meta["body_sha256"],
              "dev_metrics": c.meta["dev_metrics"]} for c, _ in accepted]
    fields = {"parent": {"iteration": iteration, "sha256": base_sha},
              "fusion": {"method": method, "params": params, "contributions": fused,
                         "rejected": sorted(rejected, key=lambda r: r["id"])}}
    try:
      store.publish_base(iteration + 1, out_dir, fields)
    except store_lib.LostRace as e:
      message = f"iteration {iteration + 1} was published by another fuser ({e}); nothing to do."
      log(message)
      return Outcome(None, fused, rejected, message)
  message = (f"published base {iteration + 1}: {method} of {len(fused)} contribution(s) "
             f"({', '.join(f['id'] for f in fused)}), {len(rejected)} rejected, "
             f"{time.time() - start:.1f}s")
  log(message)
  return Outcome(iteration + 1, fused, rejected, message)
