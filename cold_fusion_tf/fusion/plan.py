"""The plan of one fusion: the first fuser fixes in ``fusion/<i+1>/plan.json`` what is fused and
how; every later attempt (a racing fuser, a rerun after a crash) follows it."""

from __future__ import annotations

import json
import math

from cold_fusion_tf import store as store_lib
from cold_fusion_tf.errors import UserError
from cold_fusion_tf.fusion.settings import Settings
from cold_fusion_tf.fusion.validation import entry
from cold_fusion_tf.store import paths


def normalized(obj):
  """``obj`` as it reads back from JSON (tuples become lists, ...), for comparisons."""
  return json.loads(json.dumps(obj, sort_keys=True))


def check_plan(plan: dict, where: str, iteration: int, base_sha: str) -> dict:
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


def sameentry(mine: dict, planned: dict) -> bool:
  a, b = dict(mine), dict(planned)
  a.pop("update_z", None)
  b.pop("update_z", None)
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
      raise UserError(f"{where}: contribution {cid} is no longer there as planned (missing, "
                      "changed or now invalid); delete the plan to plan again.")
    ids.append(cid)
  return ids
