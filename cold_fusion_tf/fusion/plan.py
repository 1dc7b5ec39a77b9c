"""The plan of one fusion: the first fuser fixes in ``fusion/<i+1>/plan.json`` what is fused and
how; every later attempt (a racing fuser, a rerun after a crash) follows it.

A plan that can no longer be followed (a planned contribution is gone, changed or now
rejected; the plan is malformed; its fused base failed the check before publishing) is
replaced by a new one, by compare-and-swap, so a plan never makes every rerun fail the
same way. Only a plan made with other fusion settings stops the fuser: that is the
operator's call."""

from __future__ import annotations

import json
import math

from cold_fusion_tf import store as store_lib
from cold_fusion_tf.errors import UserError
from cold_fusion_tf.fusion.settings import Settings
from cold_fusion_tf.fusion.validation import entry
from cold_fusion_tf.store import layout
from cold_fusion_tf.store import paths

MAX_PLAN_BYTES = layout.MAX_JSON_BYTES - (64 << 10)
"""The largest plan a fuser writes: its manifest (the plan's sections and a few more fields)
must stay within what every reader of a store accepts (:data:`layout.MAX_JSON_BYTES`)."""


def normalized(obj):
  """``obj`` as it reads back from JSON (tuples become lists, ...), for comparisons."""
  return json.loads(json.dumps(obj, sort_keys=True))


class Unfollowable(UserError):
  """The plan cannot be followed any more: plan again."""


def check_plan(plan: dict, where: str, iteration: int, base_sha: str, target: int) -> dict:
  """Schema of a plan for base ``target`` from base ``iteration`` (untrusted store content)."""
  bad = lambda what: Unfollowable(f"{where}: {what}")  # noqa: E731
  if plan.get("format_version") != store_lib.FORMAT_VERSION:
    raise bad(f"format_version {plan.get('format_version')!r}")
  if plan.get("iteration") != target:
    raise bad(f"iteration {plan.get('iteration')!r}, expected {target}")
  if plan.get("parent") != {"iteration": iteration, "sha256": base_sha}:
    raise bad(f"made for another parent base ({plan.get('parent')!r})")
  if plan.get("fused_check_failed") is not None:
    raise bad(f"its fused base failed the check ({plan['fused_check_failed']})")
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
    weight, clip = e.get("weight"), e.get("clip", {})
    if weight is not None and not (_number(weight) and 0 < weight < 2.0 ** 64):
      raise bad(f"the weight of {e['id']} is not a positive number")
    if not isinstance(clip, dict) or not all(_number(f) and 0 < f <= 1 for f in clip.values()):
      raise bad(f"the clip factors of {e['id']} are not numbers in (0, 1]")
    seen.add(e["id"])
  for r in rejected:
    if not (isinstance(r, dict) and isinstance(r.get("id"), str)
            and isinstance(r.get("reason"), str)):
      raise bad("a rejected entry is malformed")
  return plan


def fit(plan: dict) -> dict:
  """``plan`` made small enough for :data:`MAX_PLAN_BYTES`: however many ids a store lists,
  the manifest of the base it publishes stays readable. Past the budget, only the first
  rejections (in id order) are listed and ``rejected_not_listed`` counts the others; then
  the fused contributions' dev metrics are left out. A UserError, before anything is
  written, when even that is too large."""
  fusion = plan["fusion"]
  rejected = fusion["rejected"]

  def sized(kept: int, metrics: bool = True) -> tuple[dict, int]:
    section = {**fusion, "rejected": rejected[:kept]}
    if kept < len(rejected):
      section["rejected_not_listed"] = len(rejected) - kept
    if not metrics:
      section["contributions"] = [{**e, "dev_metrics": {}} for e in fusion["contributions"]]
    candidate = {**plan, "fusion": section}
    return candidate, len(layout.json_bytes(candidate))

  candidate, size = sized(len(rejected))
  if size <= MAX_PLAN_BYTES:
    return plan
  low, high = 0, len(rejected)  # the most rejections that fit: in [low, high)
  while high - low > 1:
    middle = (low + high) // 2
    low, high = (middle, high) if sized(middle)[1] <= MAX_PLAN_BYTES else (low, middle)
  candidate, size = sized(low)
  if size > MAX_PLAN_BYTES:
    candidate, size = sized(0, metrics=False)
  if size > MAX_PLAN_BYTES:
    raise UserError(f"{len(fusion['contributions'])} contributions to fuse make a plan of "
                    f"{size} bytes, more than the {MAX_PLAN_BYTES} a store's manifest may "
                    "hold; nothing was planned or published. Fuse fewer at a time "
                    "(a smaller config.fusion.min_contributions and an earlier fusion).")
  return candidate


def _number(value) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def sameentry(mine: dict, planned: dict) -> bool:
  a, b = dict(mine), dict(planned)
  # Decided by the plan and given to every attempt (dev metrics: only a record, left out of
  # a plan too large with them).
  for key in ("update_z", "weight", "clip", "dev_metrics"):
    a.pop(key, None)
    b.pop(key, None)
  norm_a, norm_b = a.pop("update_norm", None), b.pop("update_norm", None)
  if not isinstance(norm_b, (int, float)) or not math.isclose(norm_a, norm_b, rel_tol=1e-6,
                                                                 abs_tol=1e-12):
    return False
  return normalized(a) == normalized(b)


def follow(plan: dict, where: str, checked: dict, settings: Settings) -> list[str]:
  """Checks that the plan can be followed with these settings and bodies: the ids to fuse."""
  theirs = {k: plan["fusion"].get(k) for k in settings.plan_fields()}
  if normalized(theirs) != normalized(settings.plan_fields()):
    raise UserError(f"{where}: this iteration was planned with other fusion settings "
                    f"({json.dumps(theirs, sort_keys=True)}); rerun with those, or delete the "
                    "plan if the fuser that made it is gone.")
  ids = []
  for planned in plan["fusion"]["contributions"]:
    cid = planned["id"]
    mine = checked.get(cid)
    if mine is None or not sameentry(entry(mine, None), planned):
      raise Unfollowable(f"{where}: contribution {cid} is no longer there as planned "
                         "(missing, changed or now rejected)")
    ids.append(cid)
  return ids
