"""The store protocol shared by contributors and the fuser (format version 1): every object
name and every schema, in one place.

::

  <store>/
    run.json                          written once: model type, source, settings, format version
    bases/000000/                     a Hugging Face model directory ...
        config.json, model.safetensors, tokenizer files
        manifest.json                 ... complete only once this is written (LAST)
    LATEST                            newest complete iteration, moved by compare-and-swap
    contributions/000003/<id>/
        body.safetensors              the fine-tuned encoder body (same names as the base)
        contribution.json             written LAST
    fusion/000004/plan.json           what the fusion of base 4 fuses and rejects (exclusive create)
    fusion/000004/momentum.safetensors  server optimizer state after base 4 (when enabled)
    contributors.json                 (optional, the owner's) who may contribute: Ed25519 keys
    rollbacks/000005.json             LATEST moved back from base 5: to which base, who, why
    loop/000003.json                  the settings the run program trains iteration 3 with
    evaluations/000003.json           evaluation runs and scores of base 3 (written by run)
    report.md, report.csv, report.png

Everything read back is untrusted: JSON schemas, names, sizes and sha256 are checked, and
JSON is parsed with limits (:mod:`.untrusted`).

Iterations: base ``i+1``'s parent is base ``i``, except after a rollback: the fusion that
follows a rollback from base ``m`` to base ``n`` publishes base ``m+1`` with parent ``n``
(published bases are never rewritten); see :func:`next_iteration`.
"""

from __future__ import annotations

import json
import math
import re

from cold_fusion_tf.errors import UserError
from cold_fusion_tf.store import paths
from cold_fusion_tf.store import untrusted

FORMAT_VERSION = 1
RUN_FILE = "run.json"
LATEST_FILE = "LATEST"
MANIFEST = "manifest.json"
CONTRIBUTION = "contribution.json"
BODY = "body.safetensors"
MODEL = "model.safetensors"
_SHA = re.compile(r"^[0-9a-f]{64}$")
MAX_JSON_BYTES = 4 << 20
"""The largest JSON object of a store (checked by size before it is read)."""
MAX_CONTRIBUTION_BYTES = 16 << 10
"""The largest contribution.json (one is about 1 KB): the fuser holds every contribution's
parsed metadata at once, so its size, not only the store's count of them, bounds the memory."""
CONTRIBUTION_DEPTH = 3
"""The deepest nesting of a contribution.json (the object, its dev_metrics, one more)."""
PLAN = "plan.json"
STATE = "momentum.safetensors"
CONTRIBUTORS_FILE = "contributors.json"
ROLLBACKS = "rollbacks"
MAX_NUM_EXAMPLES = 2 ** 53
"""The most training examples a contribution may claim (exact as a float64)."""
_MAX_DEV_METRICS = 64


def base_name(iteration: int) -> str:
  """``bases/NNNNNN``: the folder of a published base."""
  return f"bases/{paths.iteration_name(iteration)}"


def contributions_name(iteration: int) -> str:
  """``contributions/NNNNNN``: the folder of the contributions to base ``iteration``."""
  return f"contributions/{paths.iteration_name(iteration)}"


def contribution_name(iteration: int, contributor_id: str) -> str:
  paths.check_path_part(contributor_id, "Contributor id")
  return f"{contributions_name(iteration)}/{contributor_id}"


def plan_name(iteration: int) -> str:
  """``fusion/NNNNNN/plan.json``: the plan of the fusion that publishes base ``iteration``."""
  return f"fusion/{paths.iteration_name(iteration)}/{PLAN}"


def state_name(iteration: int) -> str:
  """``fusion/NNNNNN/momentum.safetensors``: the server optimizer state after base ``iteration``."""
  return f"fusion/{paths.iteration_name(iteration)}/{STATE}"


def rollback_name(withdrawn: int) -> str:
  """``rollbacks/NNNNNN.json``: the record of moving LATEST back from base ``withdrawn``."""
  return f"{ROLLBACKS}/{paths.iteration_name(withdrawn)}.json"


def withdrawn_up_to(names) -> int:
  """The highest base withdrawn by a rollback, from the names under ``rollbacks/`` (-1: none)."""
  numbers = [paths.parse_iteration_name(n[:-len(".json")]) for n in names if n.endswith(".json")]
  return max([n for n in numbers if n is not None], default=-1)


def next_iteration(latest: int, withdrawn: int) -> int:
  """The iteration the next fusion publishes from base ``latest``: ``latest + 1``, or past
  every withdrawn base (``withdrawn``, from :func:`withdrawn_up_to`) after a rollback."""
  return max(latest, withdrawn) + 1


def evaluation_name(iteration: int) -> str:
  """``evaluations/NNNNNN.json``: the scores of base ``iteration``."""
  return f"evaluations/{paths.iteration_name(iteration)}.json"


def json_bytes(obj) -> bytes:
  """How every JSON object of the store is written (sorted keys; NaN and inf refused)."""
  return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def parse_json(data: bytes, where: str, max_bytes: int = MAX_JSON_BYTES,
               max_depth: int = untrusted.MAX_DEPTH) -> dict:
  """A store JSON object from untrusted bytes (size, nesting and numbers bounded)."""
  if len(data) > max_bytes:
    raise UserError(f"{where}: larger than {max_bytes} bytes; not a store file.")
  obj = untrusted.loads(data, where, max_depth)
  if not isinstance(obj, dict):
    raise UserError(f"{where}: expected a JSON object.")
  return obj


def require(obj: dict, key: str, types, where: str):
  value = obj.get(key)
  if not isinstance(value, types) or isinstance(value, bool) and bool not in (
      types if isinstance(types, tuple) else (types,)):
    raise UserError(f"{where}: field {key!r} is missing or has the wrong type "
                    f"({type(value).__name__}).")
  return value


def check_sha(value, where: str) -> str:
  if not isinstance(value, str) or not _SHA.fullmatch(value):
    raise UserError(f"{where}: {value!r} is not a sha256 hex digest.")
  return value


def check_manifest(obj: dict, where: str) -> dict:
  """Schema of a base manifest."""
  if obj.get("format_version") != FORMAT_VERSION:
    raise UserError(f"{where}: format_version {obj.get('format_version')!r}; this code reads "
                    f"version {FORMAT_VERSION}. Upgrade cold_fusion_tf or use a matching store.")
  require(obj, "iteration", int, where)
  files = require(obj, "files", dict, where)
  for required in ("config.json", MODEL):
    if required not in files:
      raise UserError(f"{where}: files lacks {required}.")
  for name, info in files.items():
    paths.check_path_part(name, f"{where}: file name")
    if name == MANIFEST or not isinstance(info, dict):
      raise UserError(f"{where}: bad entry for file {name!r}.")
    check_sha(info.get("sha256"), f"{where}: files.{name}.sha256")
    size = info.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
      raise UserError(f"{where}: files.{name}.size is not a non-negative integer.")
  return obj


def read_contribution_meta(data: bytes, where: str) -> dict:
  """A contribution.json from untrusted bytes: parsed within its own bounds, then checked."""
  return check_contribution_meta(parse_json(data, where, MAX_CONTRIBUTION_BYTES,
                                            CONTRIBUTION_DEPTH), where)


def check_contribution_meta(obj: dict, where: str) -> dict:
  """Schema of contribution.json."""
  if obj.get("format_version") != FORMAT_VERSION:
    raise UserError(f"{where}: format_version {obj.get('format_version')!r} is not "
                    f"{FORMAT_VERSION}.")
  require(obj, "base_iteration", int, where)
  check_sha(obj.get("base_sha256"), f"{where}: base_sha256")
  check_sha(obj.get("body_sha256"), f"{where}: body_sha256")
  paths.check_path_part(require(obj, "contributor_id", str, where), f"{where}: contributor_id")
  paths.check_path_part(require(obj, "dataset", str, where), f"{where}: dataset")
  examples = require(obj, "num_examples", int, where)
  if not 0 < examples <= MAX_NUM_EXAMPLES:
    raise UserError(f"{where}: num_examples must be 1..2**53, got {examples}.")
  require(obj, "steps", int, where)
  if len(require(obj, "dev_metrics", dict, where)) > _MAX_DEV_METRICS:
    raise UserError(f"{where}: more than {_MAX_DEV_METRICS} dev_metrics.")
  size = obj.get("body_size")
  if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
    raise UserError(f"{where}: body_size is not a non-negative integer.")
  if "signature" in obj and not isinstance(obj["signature"], str):
    raise UserError(f"{where}: signature is not a string.")
  return obj


REPORT_FILES = ("report.md", "report.csv", "report.png")
"""The loop's report of the evaluated bases (written by run, replaced as it goes)."""


def check_run(record) -> bool:
  """Whether ``record`` is a well-formed evaluation run: a line of the evaluate program's
  ``results.jsonl`` or an entry of ``runs`` in ``evaluations/<i>.json``. Its identity
  (``model`` sha256, ``name``, ``task``, ``task_key``, ``mode``, ``recipe_key``) is strings, its
  ``seed`` an integer, its ``score`` a finite number."""
  if not isinstance(record, dict):
    return False
  if not all(isinstance(record.get(k), str) for k in
             ("model", "name", "task", "task_key", "mode", "recipe_key")):
    return False
  seed, score = record.get("seed"), record.get("score")
  return (isinstance(seed, int) and not isinstance(seed, bool)
          and isinstance(score, (int, float)) and not isinstance(score, bool)
          and math.isfinite(score))


def evaluation_document(iteration: int, base_sha256: str, contributors, runs) -> dict:
  """``evaluations/<i>.json``, built here only (the loop writes it; inspect and the model card
  read its ``scores``)::

    {"iteration": 3, "base_sha256": ..., "contributors": [datasets fused into base 3],
     "runs": [every evaluation run of base 3, as the evaluate program records them],
     "scores": {task: {"score": mean, "std": std over seeds, "scores": [score per seed]}}}

  ``scores`` summarises each task's newest runs: those with the data, mode and recipe of the
  task's last run, in seed order.
  """
  newest = {r["task"]: (r["task_key"], r["mode"], r["recipe_key"]) for r in runs}
  scores = {}
  for task, identity in newest.items():
    values = [r["score"] for r in sorted(runs, key=lambda r: r["seed"]) if r["task"] == task
              and (r["task_key"], r["mode"], r["recipe_key"]) == identity]
    mean = sum(values) / len(values)
    std = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
           if len(values) > 1 else 0.0)
    scores[task] = {"score": mean, "std": std, "scores": values}
  return {"iteration": iteration, "base_sha256": base_sha256,
          "contributors": list(contributors), "runs": list(runs), "scores": scores}


def check_evaluation(obj: dict, where: str) -> dict:
  """Schema of ``evaluations/<i>.json`` (a file without ``runs``, from an older version,
  has none to reuse)."""
  require(obj, "iteration", int, where)
  runs = obj.setdefault("runs", [])
  if not isinstance(runs, list):
    raise UserError(f"{where}: runs is not a list; delete the file to evaluate the base again.")
  for i, run in enumerate(runs):
    if not check_run(run):
      raise UserError(f"{where}: run {i} is malformed; delete the file to evaluate the base "
                      "again.")
  contributors = obj.get("contributors", [])
  if not isinstance(contributors, list) or not all(isinstance(c, str) for c in contributors):
    raise UserError(f"{where}: contributors is not a list of dataset names.")
  return obj
