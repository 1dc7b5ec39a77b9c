"""The lineage of a store, for people: every base, who contributed, their dev metrics, who was
rejected and why, evaluation scores; then the open iteration.

Only JSON files are read (manifests, plans, contribution.json, evaluations), never weights,
so it is quick on any store. Their contents are untrusted: odd fields are shown as ``?`` and
every string is stripped of control characters before it reaches the terminal.
"""

from __future__ import annotations

import math
from typing import Optional

from cold_fusion_tf.store import layout
from cold_fusion_tf.store import paths
from cold_fusion_tf.store import rollbacks
from cold_fusion_tf.store import untrusted
from cold_fusion_tf import store as store_lib
from cold_fusion_tf.errors import UserError


def not_listed(section: dict) -> int:
  """How many rejections a manifest's fusion section counts without listing them (a plan
  too large for every id lists the first ones); 0 when it says nothing valid."""
  more = section.get("rejected_not_listed")
  return more if isinstance(more, int) and not isinstance(more, bool) and more > 0 else 0


def _text(value, limit: int = 200) -> str:
  """A printable one-line version of an untrusted value."""
  return untrusted.printable(value, limit)


def _chain(store: store_lib.Store, latest: int) -> list[int]:
  """The bases of LATEST's lineage, oldest first (after a rollback, withdrawn bases are left
  out); a base whose parent cannot be read is followed by the highest-numbered base folder
  below it (base 0 when there is none), so a LATEST far beyond the bases costs one line."""
  folders = None
  chain = [latest]
  while chain[-1] > 0:
    try:
      parent = rollbacks.parent_of(store, chain[-1])
    except UserError:
      if folders is None:
        folders = sorted(int(n) for n in store.storage.list_children("bases")
                         if n.isascii() and n.isdigit())
      parent = max([n for n in folders if n < chain[-1]], default=0)
    chain.append(parent)
  return chain[::-1]


def _number(value) -> Optional[float]:
  ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  return float(value) if ok and math.isfinite(value) else None


def _list_of_dicts(value) -> list[dict]:
  return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _evaluation(store: store_lib.Store, iteration: int) -> tuple[dict, Optional[str]]:
  """{task: {"score", "std", "runs"}} from evaluations/<iteration>.json, and a problem."""
  name = f"evaluations/{paths.iteration_name(iteration)}.json"
  try:
    saved = store.read_json(name)
  except UserError as e:
    return {}, str(e)
  scores = {}
  for task, value in sorted(((saved or {}).get("scores") or {}).items()):
    if isinstance(value, dict) and _number(value.get("score")) is not None:
      runs = value.get("scores")
      scores[_text(task, 64)] = {"score": _number(value["score"]),
                                 "std": _number(value.get("std")),
                                 "runs": len(runs) if isinstance(runs, list) else None}
  return scores, None


def lineage(store: store_lib.Store) -> dict:
  """Everything :func:`format_lineage` prints, as plain data."""
  info = store.run_info()
  latest = store.require_latest()
  bases, previous_sha, previous = [], None, None
  for iteration in _chain(store, latest):
    row = {"iteration": iteration, "problems": []}
    try:
      manifest = store.manifest(iteration)
    except UserError as e:
      row["problems"].append(str(e))
      bases.append(row)
      previous_sha = None
      continue
    row["sha256"] = manifest["files"][store_lib.MODEL]["sha256"]
    parent = manifest.get("parent")
    if iteration == 0:
      row["source_model"] = _text(manifest.get("source_model") or info.get("source_model"))
    elif isinstance(parent, dict):
      row["parent"] = {"iteration": parent.get("iteration"), "sha256": parent.get("sha256")}
      if parent.get("iteration") != previous or (
          previous_sha is not None and parent.get("sha256") != previous_sha):
        row["problems"].append(f"its parent is {_text(parent)}, not base {previous} "
                               f"({(previous_sha or '?')[:12]})")
    else:
      row["problems"].append("the manifest names no parent base")
    section = manifest.get("fusion")
    if isinstance(section, dict):
      row["method"] = _text(section.get("method"))
      row["params"] = section.get("params") if isinstance(section.get("params"), dict) else {}
      server = section.get("server_optimizer")
      row["server_optimizer"] = server if isinstance(server, dict) else None
      row["fused"] = _list_of_dicts(section.get("contributions"))
      row["rejected"] = _list_of_dicts(section.get("rejected"))
      row["rejected_not_listed"] = not_listed(section)
    row["evaluation"], problem = _evaluation(store, iteration)
    if problem:
      row["problems"].append(problem)
    row["code_version"] = _text(manifest.get("code_version"))
    bases.append(row)
    previous_sha, previous = row["sha256"], iteration
  found, unreadable = store.contributions(latest)
  try:
    target = store.next_iteration(latest)
    plan, manifest = layout.plan_name(target), f"{store.base_prefix(target)}/{store_lib.MANIFEST}"
  except UserError:  # LATEST is the last iteration a store can number
    target = plan = manifest = None
  pending = {"iteration": latest,
             "contributions": [{"id": c.contributor_id, "dataset": c.meta["dataset"],
                                "num_examples": c.meta["num_examples"],
                                "dev_metrics": c.meta["dev_metrics"],
                                "stale": c.meta["base_sha256"] != bases[-1].get("sha256")}
                               for c in found],
             "unreadable": unreadable,
             "planned": plan is not None and store.storage.exists(plan),
             "next": target,
             "unpublished_manifest": manifest is not None and store.storage.exists(manifest)}
  return {"uri": store.uri, "model_type": _text(info.get("model_type")),
          "rollbacks": [{k: (v if isinstance(v, (int, list)) else _text(v, 300))
                         for k, v in r.items()} for r in rollbacks.records(store)],
          "source_model": _text(info.get("source_model")), "latest": latest, "bases": bases,
          "open": pending}


def _metrics(value) -> str:
  if not isinstance(value, dict):
    return ""
  parts = [f"{_text(k, 32)}={_number(v):.4g}" for k, v in sorted(value.items())
           if _number(v) is not None]
  return " ".join(parts[:6])


def _contribution_line(entry: dict) -> str:
  examples = entry.get("num_examples")
  line = (f"    {_text(entry.get('id'), 40):<20} dataset {_text(entry.get('dataset'), 40):<18} "
          f"{examples if isinstance(examples, int) else '?':>8} examples")
  metrics = _metrics(entry.get("dev_metrics"))
  if metrics:
    line += f"  dev {metrics}"
  norm, z = _number(entry.get("update_norm")), _number(entry.get("update_z"))
  if norm is not None:
    line += f"  update {norm:.4g}" + (f" (z {z:+.2f})" if z is not None else "")
  return line


def format_lineage(data: dict) -> str:
  """The lineage as text, one block per base, then the open iteration."""
  lines = [f"store {data['uri']}: {data['model_type']} from {data['source_model']}, "
           f"LATEST = {data['latest']}"]
  for row in data["bases"]:
    lines.append("")
    head = f"base {row['iteration']}"
    if "sha256" in row:
      head += f"  sha256 {row['sha256'][:12]}"
    if row["iteration"] == 0:
      head += f"  source {row.get('source_model', '?')}"
    elif "parent" in row:
      parent = row["parent"]
      head += (f"  parent {_text(parent.get('iteration'))} "
               f"({_text(parent.get('sha256'))[:12]})")
    if row.get("method"):
      params = ", ".join(f"{_text(k, 32)}={_text(v, 32)}" for k, v in
                         sorted(row.get("params", {}).items()))
      head += f"  method {row['method']}" + (f"({params})" if params else "")
    server = row.get("server_optimizer")
    if server:
      head += (f"  server optimizer lr={_text(server.get('lr'))} "
               f"momentum={_text(server.get('momentum'))} "
               f"nesterov={_text(server.get('nesterov'))}")
    lines.append(head)
    for problem in row["problems"]:
      lines.append(f"  PROBLEM: {_text(problem, 300)}")
    if "fused" in row:
      lines.append(f"  fused ({len(row['fused'])}):")
      lines.extend(_contribution_line(e) for e in row["fused"])
      more = row.get("rejected_not_listed", 0)
      if row["rejected"] or more:
        lines.append(f"  rejected ({len(row['rejected']) + more}):")
        for r in row["rejected"]:
          lines.append(f"    {_text(r.get('id'), 40):<20} {_text(r.get('reason'), 300)}")
        if more:
          lines.append(f"    and {more} more, not listed (the manifest holds a bounded list)")
    if row.get("evaluation"):
      lines.append("  evaluation:")
      for task, s in row["evaluation"].items():
        extra = f" +- {s['std']:.4f}" if s["std"] else ""
        runs = f" ({s['runs']} run{'s' if s['runs'] != 1 else ''})" if s["runs"] else ""
        lines.append(f"    {task:<24} {s['score']:.4f}{extra}{runs}")
  for r in data.get("rollbacks", []):
    lines.append("")
    lines.append(f"rollback from base {_text(r.get('from'))} to base {_text(r.get('to'))} "
                 f"by {_text(r.get('by'))} at {_text(r.get('time'))}: {_text(r.get('reason'), 300)}"
                 + (f"  PROBLEM: {_text(r['problem'], 300)}" if r.get("problem") else ""))
  pending = data["open"]
  lines.append("")
  lines.append(f"iteration {pending['iteration']} (open): "
               f"{len(pending['contributions'])} contribution(s) so far"
               + ("; a fuser has planned it" if pending["planned"] else "")
               + ("; base {} has a manifest but LATEST has not moved (an interrupted "
                  "publish: run the fuser again)".format(pending.get("next"))
                  if pending["unpublished_manifest"] else ""))
  for c in pending["contributions"]:
    lines.append(_contribution_line(c) + ("  STALE" if c["stale"] else ""))
  for r in pending["unreadable"]:
    lines.append(f"    {_text(r.get('id'), 40):<20} unreadable: {_text(r.get('reason'), 300)}")
  return "\n".join(lines)
