"""What a rerun of the loop on an existing store may change, checked before any work.

A rerun resumes from ``LATEST``; settings may change between runs, but never so that one
base mixes two configurations or a report calls a trained-on task held out:

* ``config.model.source`` must be the store's (``run.json``): the lineage starts from base 0;
* no dataset of ``config.heldout`` may have been fused into the newest base or its ancestors;
* the open iteration (``LATEST``, when the run trains it) is finished with the settings it
  started with: the loop records them in ``loop/<iteration>.json`` before its first
  contributor (the chosen contributors, their data, the training recipe, the body and the
  fusion settings), and a rerun whose settings differ there is refused. The next iterations
  use the new settings.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Mapping, Sequence

from cold_fusion_tf import data as data_lib
from cold_fusion_tf.errors import UserError
from cold_fusion_tf.evaluation import pipeline
from cold_fusion_tf.fusion.settings import Settings as FusionSettings
from cold_fusion_tf.model import sources
from cold_fusion_tf.store import paths


def record_name(iteration: int) -> str:
  """``loop/NNNNNN.json``: the settings the loop trains iteration ``iteration`` with."""
  return f"loop/{paths.iteration_name(iteration)}.json"


def _plain(value):
  """``value`` as JSON gives it back (tuples as lists, keys as strings)."""
  return json.loads(json.dumps(value, sort_keys=True, default=str))


def iteration_settings(config, chosen: Sequence[str], tasks: Mapping) -> dict:
  """What makes the contributions and the fusion of one iteration (see the module doc)."""
  recipe = {k: v for k, v in config.recipe.to_dict().items()
            if k not in pipeline.NOT_COMPUTING}
  return _plain({
      "contributors": [data_lib.dataset_id(n) for n in chosen],
      "data": {data_lib.dataset_id(n): pipeline.task_key(tasks[n]) for n in chosen},
      "recipe": recipe,
      "body": [config.model.get("body", "transformers_tf"), config.model.get("backend", "")],
      "fusion": {**FusionSettings.from_config(config.fusion).plan_fields(),
                 "min_contributions": config.fusion.get("min_contributions", 1)},
  })


def _differences(saved: Mapping, now: Mapping) -> list[str]:
  out = []
  if saved.get("contributors") != now["contributors"]:
    out.append(f"contributors {', '.join(saved.get('contributors') or [])} (now "
               f"{', '.join(now['contributors'])}: config.pool, config.seed or "
               "config.contributors_per_iteration)")
  changed = sorted(n for n in now["data"] if n in (saved.get("data") or {})
                   and saved["data"][n] != now["data"][n])
  if changed:
    out.append(f"the data of {', '.join(changed)} (config.data)")
  for section, label in (("recipe", "config.recipe"), ("fusion", "config.fusion")):
    old, new = saved.get(section) or {}, now[section]
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if keys:
      out.append(", ".join(f"{label}.{k}={old.get(k)!r} (now {new.get(k)!r})" for k in keys))
  if saved.get("body") != now["body"]:
    out.append(f"config.model.body/backend={saved.get('body')!r} (now {now['body']!r})")
  return out


def check_open_iteration(store, iteration: int, settings: dict) -> bool:
  """Raises UserError when iteration ``iteration`` was started with other settings; returns
  whether its record is still to be written."""
  saved = store.read_json(record_name(iteration))
  if saved is None:
    return True
  differences = _differences(saved, settings)
  if differences:
    raise UserError(
        f"{store.uri}: iteration {iteration} was started with other settings: "
        f"{'; '.join(differences)}. The iteration so far was made with those, and "
        "one base does not mix two configurations: rerun with the settings it started with "
        f"to finish iteration {iteration} (yours apply from the next one), or use a new "
        "--store.")
  return False


def write_record(store, iteration: int, settings: dict) -> None:
  store.write_json(record_name(iteration), {"iteration": iteration, **settings})


def _same_source(stored: str, given: str) -> bool:
  if stored == given:
    return True
  try:
    a, b = sources.resolve_source(stored), sources.resolve_source(given)
  except UserError:
    return False
  return os.path.isdir(a) and os.path.isdir(b) and os.path.realpath(a) == os.path.realpath(b)


def check_source(store, config) -> None:
  """An existing store continues from its own base 0: another model source is refused."""
  stored = store.run_info().get("source_model") or ""
  given = str(config.model.source)
  if stored and not _same_source(stored, given):
    raise UserError(f"{store.uri} was created from {stored!r}, not config.model.source="
                    f"{given!r}: its bases descend from that model. Pass "
                    f"--config.model.source={stored} to continue it, or use a new --store for "
                    f"{given!r}.")


def fused_datasets(store, latest: int) -> dict[str, list[int]]:
  """{dataset id: bases it was fused into} over base ``latest`` and its ancestors."""
  out: dict[str, list[int]] = {}
  iteration, seen = latest, set()
  while iteration and iteration not in seen:
    seen.add(iteration)
    manifest = store.manifest(iteration)
    for c in (manifest.get("fusion") or {}).get("contributions", []):
      if isinstance(c, dict) and isinstance(c.get("dataset"), str):
        out.setdefault(c["dataset"], []).insert(0, iteration)
    parent = manifest.get("parent") or {}
    iteration = parent.get("iteration", iteration - 1) if isinstance(parent, dict) else 0
  return out


def check_heldout(store, config, latest: int) -> None:
  """A held-out task is one no base of the lineage was trained on."""
  fused = fused_datasets(store, latest)
  trained = [(n, fused[data_lib.dataset_id(n)]) for n in config.heldout
             if data_lib.dataset_id(n) in fused]
  if trained:
    names = "; ".join(f"{n} was fused into base(s) {', '.join(map(str, b))}"
                      for n, b in trained)
    raise UserError(f"config.heldout: {names} of {store.uri}: a held-out task must never have "
                    "been trained on, or its scores would be reported as held-out; remove it "
                    "from config.heldout (config.pool reports it as held-in), or use a new "
                    "--store.")


def check_rerun(store, config, tasks: Mapping, sample: Callable[[int], list[str]],
                log: Callable[[str], None]) -> None:
  """Every check of a rerun on an existing store (none for a new one), before any work."""
  if not store.exists():
    return
  check_source(store, config)
  latest = store.latest()
  if latest is None:
    return
  check_heldout(store, config, latest)
  if latest < config.iterations:
    check_open_iteration(store, latest, iteration_settings(config, sample(latest), tasks))
  elif latest > config.iterations:
    log(f"note: the store is at base {latest}, past config.iterations={config.iterations}; "
        "nothing is trained (bases are never removed: a rollback withdraws them).")
