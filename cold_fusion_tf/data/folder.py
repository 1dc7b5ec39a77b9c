"""Dataset folders of JSONL / CSV / TSV files: name resolution and a validating reader."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Mapping, Optional, Sequence

import numpy as np

from cold_fusion_tf.data.tasks import SPLITS, Split, TaskData
from cold_fusion_tf.errors import UserError
from cold_fusion_tf.store.paths import check_path_part

_EXTENSIONS = (".jsonl", ".csv", ".tsv")
_MAX_TEXT_CHARS = 100_000


def resolve_dir(name: str, dirs: Sequence[str]) -> str:
  """The folder of a named dataset; a clear error listing what exists if not found."""
  if os.sep in name or name.startswith("."):
    path = os.path.abspath(name)
    if not os.path.isdir(path):
      raise UserError(f"Dataset folder {name!r} does not exist.")
    return path
  check_path_part(name, "Dataset name")
  searched = [os.path.abspath(d) for d in dirs]
  for d in searched:
    path = os.path.join(d, name)
    if os.path.isdir(path):
      return path
  known = sorted({n for d in searched if os.path.isdir(d) for n in os.listdir(d)
                  if os.path.isdir(os.path.join(d, n))})
  raise UserError(f"Unknown dataset {name!r}: no folder {name}/ in {searched}. "
                  f"Known datasets: {', '.join(known) or 'none'}. Add its folder to "
                  "--config.data.dirs, give a path, or use tfds:<name>.")


# --------------------------------------------------------------------------------------------
# Folders of JSONL / CSV / TSV files
# --------------------------------------------------------------------------------------------


def load_folder(path: str, columns: Mapping[str, str]) -> TaskData:
  """Reads a dataset folder; every problem names the file and line and says how to fix it."""
  info = _read_info(path)
  raw = {split: _read_records(_split_file(path, split), columns) for split in SPLITS}
  kind = info.get("task")
  if kind is None:
    kind = "regression" if any(isinstance(r[2], float) and not float(r[2]).is_integer()
                               for r in raw["train"]) else "classification"
  if kind not in ("classification", "regression"):
    raise UserError(f"{path}/info.json: task {kind!r} is not supported; use "
                    "'classification' or 'regression'.")
  label_names = info.get("label_names")
  if kind == "classification" and label_names is None:
    label_names = _infer_label_names(raw, path)
  if kind == "regression":
    label_names = []
  if not isinstance(label_names, list) or not all(isinstance(n, str) for n in label_names):
    raise UserError(f"{path}/info.json: label_names must be a list of strings.")
  if kind == "classification" and len(label_names) < 2:
    raise UserError(f"{path}: a classification task needs at least 2 labels, found {label_names}.")
  splits = {}
  pair_flags = set()
  for split, records in raw.items():
    file = _split_file(path, split)
    splits[split] = _to_split(records, kind, label_names, file)
    pair_flags.add(splits[split].pairs is not None)
  if len(pair_flags) > 1:
    raise UserError(f"{path}: some splits have text_pair and others do not; every split of a "
                    "sentence-pair task needs text_pair.")
  return TaskData(os.path.basename(path), kind, label_names, splits, path)


def _read_info(path: str) -> dict:
  file = os.path.join(path, "info.json")
  if not os.path.exists(file):
    return {}
  try:
    with open(file, encoding="utf-8") as f:
      info = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"{file}: not valid UTF-8 JSON ({e}).") from e
  if not isinstance(info, dict):
    raise UserError(f"{file}: expected a JSON object.")
  return info


def _split_file(path: str, split: str) -> str:
  found = [os.path.join(path, split + ext) for ext in _EXTENSIONS
           if os.path.exists(os.path.join(path, split + ext))]
  if not found:
    raise UserError(f"{path}: missing the {split} split: add {split}.jsonl, {split}.csv or "
                    f"{split}.tsv.")
  if len(found) > 1:
    raise UserError(f"{path}: several files for the {split} split ({found}); keep one.")
  return found[0]


def _read_records(file: str, columns: Mapping[str, str]) -> list[tuple[str, Optional[str], object, int]]:
  """(text, text_pair or None, raw label, line number) per record."""
  with open(file, "rb") as f:
    data = f.read()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise UserError(f"{file}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); re-encode the "
                    "file as UTF-8.") from e
  text = text.removeprefix("\ufeff")
  names = {k: columns.get(k, k) for k in ("text", "text_pair", "label")}
  if file.endswith(".jsonl"):
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f"{file}:{number}: not valid JSON ({e.msg}).") from e
      if not isinstance(obj, dict):
        raise UserError(f"{file}:{number}: expected a JSON object per line.")
      rows.append((obj, number))
  else:
    reader = csv.DictReader(io.StringIO(text), delimiter="\t" if file.endswith(".tsv") else ",")
    header = reader.fieldnames or []
    for key in ("text", "label"):
      if names[key] not in header:
        raise UserError(f"{file}:1: no column {names[key]!r} in the header {header}; name the "
                        f"column or map it with --config.data.columns.{key}=<column>.")
    rows = [(row, number) for number, row in enumerate(reader, 2)]
  if not rows:
    raise UserError(f"{file}: no examples; the file is empty.")
  records = []
  for obj, number in rows:
    for key in ("text", "label"):
      if obj.get(names[key]) in (None, ""):
        raise UserError(f"{file}:{number}: missing field {names[key]!r}.")
    text_value = obj[names["text"]]
    pair = obj.get(names["text_pair"])
    for key, value in (("text", text_value), ("text_pair", pair)):
      if value is not None and (not isinstance(value, str) or len(value) > _MAX_TEXT_CHARS):
        raise UserError(f"{file}:{number}: field {names[key]!r} must be a string of at most "
                        f"{_MAX_TEXT_CHARS} characters.")
    records.append((text_value, pair if pair not in ("",) else None, obj[names["label"]], number))
  return records


def _infer_label_names(raw, path) -> list[str]:
  labels = {r[2] for records in raw.values() for r in records}
  if all(isinstance(v, int) and not isinstance(v, bool) or (isinstance(v, str) and v.isdigit())
         for v in labels):
    ids = sorted(int(v) for v in labels)
    if ids[0] < 0:
      raise UserError(f"{path}: negative label {ids[0]}; class ids start at 0.")
    return [str(i) for i in range(ids[-1] + 1)]
  return sorted(str(v) for v in labels)


def _to_split(records, kind: str, label_names: list[str], file: str) -> Split:
  pairs_present = {r[1] is not None for r in records}
  if len(pairs_present) > 1:
    line = next(r[3] for r in records if r[1] is None)
    raise UserError(f"{file}:{line}: missing field 'text_pair' (other lines have it).")
  labels = []
  for _, _, label, line in records:
    labels.append(_parse_label(label, kind, label_names, f"{file}:{line}"))
  dtype = np.float32 if kind == "regression" else np.int32
  return Split([r[0] for r in records], [r[1] for r in records] if True in pairs_present else None,
               np.asarray(labels, dtype=dtype))


def _parse_label(label, kind: str, label_names: list[str], where: str):
  if kind == "regression":
    try:
      value = float(label)
    except (TypeError, ValueError):
      raise UserError(f"{where}: label {label!r} is not a number (regression task).") from None
    if not math.isfinite(value):
      raise UserError(f"{where}: label {label!r} is not finite.")
    return value
  if isinstance(label, bool):
    raise UserError(f"{where}: label {label!r} is not a class id or name.")
  if isinstance(label, str) and label in label_names:
    return label_names.index(label)
  try:
    as_int = int(label)
    if isinstance(label, float) and not label.is_integer():
      raise ValueError
  except (TypeError, ValueError):
    raise UserError(f"{where}: label {label!r} is not in the label set {label_names}.") from None
  if not 0 <= as_int < len(label_names):
    raise UserError(f"{where}: label {label!r} is outside the label set: expected 0.."
                    f"{len(label_names) - 1} ({', '.join(label_names)}).")
  return as_int
