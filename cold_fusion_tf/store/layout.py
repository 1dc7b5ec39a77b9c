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
    evaluations/000003.json           scores of base 3 (written by run)
    report.md, report.csv, report.png

Everything read back is untrusted: JSON schemas, names, sizes and sha256 are checked.
"""

from __future__ import annotations

import json
import re

from cold_fusion_tf.errors import UserError
from cold_fusion_tf.store import paths

FORMAT_VERSION = 1
RUN_FILE = "run.json"
LATEST_FILE = "LATEST"
MANIFEST = "manifest.json"
CONTRIBUTION = "contribution.json"
BODY = "body.safetensors"
MODEL = "model.safetensors"
_SHA = re.compile(r"^[0-9a-f]{64}$")
_MAX_JSON_BYTES = 4 << 20
PLAN = "plan.json"
STATE = "momentum.safetensors"


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


def evaluation_name(iteration: int) -> str:
  """``evaluations/NNNNNN.json``: the scores of base ``iteration``."""
  return f"evaluations/{paths.iteration_name(iteration)}.json"


def json_bytes(obj) -> bytes:
  """How every JSON object of the store is written (sorted keys; NaN and inf refused)."""
  return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def parse_json(data: bytes, where: str) -> dict:
  if len(data) > _MAX_JSON_BYTES:
    raise UserError(f"{where}: larger than {_MAX_JSON_BYTES} bytes; not a store file.")
  try:
    obj = json.loads(data.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"{where}: not valid UTF-8 JSON ({e}).") from e
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
  if examples <= 0:
    raise UserError(f"{where}: num_examples must be positive, got {examples}.")
  require(obj, "steps", int, where)
  require(obj, "dev_metrics", dict, where)
  return obj
