"""Dataset folders of JSONL / CSV / TSV files: name resolution and a validating reader."""

from __future__ import annotations

import csv
import math
import os
import re
import unicodedata
from typing import Mapping, Optional, Sequence

import numpy as np

from cold_fusion_tf.data.reading import (DEFAULT_MAX_FILE_MB, MAX_TEXT_CHARS,
                                         open_data, text_lines)
from cold_fusion_tf.data.tasks import SPLITS, Split, TaskData
from cold_fusion_tf.errors import UserError
from cold_fusion_tf.store import untrusted
from cold_fusion_tf.store.paths import check_path_part

EXTENSIONS = (".jsonl", ".csv", ".tsv")
"""The file types of a split: ``train.jsonl``, ``dev.csv``, ``test.tsv``."""
COLUMNS = ("text", "text_pair", "label")
"""The fields of a record (CSV/TSV columns are mapped onto them by ``config.data.columns``)."""
MAX_CLASSES = 1000
"""The most classes a task may have (label names, or class ids 0..999 without names)."""
MAX_LABEL_CHARS = 200
"""The longest label as written: a label name, a class id or a regression score."""
_MAX_INFO_BYTES = 1 << 20
_MAX_RECORD_DEPTH = 8  # a record is one flat object; its values are strings and numbers
_MAX_INFO_DEPTH = 8
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_CLASS_ID = re.compile(r"[0-9]+")  # ASCII digits only: int() also takes '²'-like characters
_SCORE = re.compile(r"[-+]?[0-9]*\.[0-9]+([eE][-+]?[0-9]+)?")


def resolve_dir(name: str, dirs: Sequence[str]) -> str:
  """The folder of a named dataset; a clear error listing what exists if not found."""
  if os.sep in name or name.startswith(".") or name.startswith("~"):
    path = os.path.abspath(os.path.expanduser(name))
    if not os.path.exists(path):
      raise UserError(f"Dataset folder {name!r} does not exist.")
    if not os.path.isdir(path):
      raise UserError(f"Dataset {name!r} is a file, not a folder: give the folder that holds "
                      "its train, dev and test files.")
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
                  f"Known datasets: {_first(known, 20) or 'none'}. Add its folder to "
                  "--config.data.dirs, give a path, or use tfds:<name>.")


# --------------------------------------------------------------------------------------------
# Folders of JSONL / CSV / TSV files
# --------------------------------------------------------------------------------------------


def _first(names: Sequence[str], count: int) -> str:
  """Up to ``count`` of ``names``, then how many more there are."""
  more = f" and {len(names) - count} more" if len(names) > count else ""
  return ", ".join(untrusted.printable(n, 60) for n in names[:count]) + more


def load_folder(path: str, columns: Mapping[str, str],
                max_file_mb: int = DEFAULT_MAX_FILE_MB) -> TaskData:
  """Reads a dataset folder, each file of at most ``max_file_mb`` MiB; every problem names the
  file and line and says how to fix it."""
  names = column_names(columns)
  info = _read_info(path)
  files = {split: _split_file(path, split) for split in SPLITS}
  raw = {split: _read_records(file, names, max_file_mb << 20) for split, file in files.items()}
  kind = info.get("task")
  if kind is None:
    kind = "regression" if any(_is_score(r[2]) for r in raw["train"]) else "classification"
  if kind not in ("classification", "regression"):
    raise UserError(f"{path}/info.json: task {untrusted.printable(repr(kind), 60)} is not "
                    "supported; use 'classification' or 'regression'.")
  if kind == "regression":
    if info.get("label_names"):
      raise UserError(f"{path}/info.json: label_names name classes, but the task is regression "
                      "(scores); remove label_names, or make the task classification.")
    label_names = []
  elif "label_names" in info:
    label_names = _checked_label_names(info["label_names"], f"{path}/info.json")
  else:
    label_names = _infer_label_names(raw, files)
  splits = {}
  pair_flags = set()
  for split, records in raw.items():
    splits[split] = _to_split(records, kind, label_names, files[split], names["text_pair"])
    pair_flags.add(splits[split].pairs is not None)
  if len(pair_flags) > 1:
    raise UserError(f"{path}: some splits have text_pair and others do not; every split of a "
                    "sentence-pair task needs text_pair.")
  return TaskData(os.path.basename(path), kind, label_names, splits, path)


def column_names(columns: Mapping[str, str]) -> dict[str, str]:
  """The column (JSON key) of each record field: ``columns`` checked, others by their name."""
  if not isinstance(columns, Mapping):
    raise UserError(f"config.data.columns must map record fields ({', '.join(COLUMNS)}) to "
                    f"column names, got {untrusted.printable(columns, 80)}.")
  unknown = sorted(str(k) for k in columns if k not in COLUMNS)
  if unknown:
    raise UserError(f"config.data.columns: unknown field(s) {', '.join(unknown)}; the fields are "
                    f"{', '.join(COLUMNS)}.")
  for key, value in columns.items():
    if not isinstance(value, str) or not value or len(value) > MAX_LABEL_CHARS:
      raise UserError(f"config.data.columns.{key}={untrusted.printable(value, 80)!r}: expected "
                      "a column name.")
  names = {k: columns.get(k, k) for k in COLUMNS}
  for i, key in enumerate(COLUMNS):
    twice = [other for other in COLUMNS[i + 1:] if names[other] == names[key]]
    if twice:
      raise UserError(f"config.data.columns: {key} and {twice[0]} both read the column "
                      f"{untrusted.printable(names[key], 60)!r}; map each field to its own "
                      f"column (--config.data.columns.{key}=<column>).")
  return names


def _read_info(path: str) -> dict:
  file = os.path.join(path, "info.json")
  if not os.path.lexists(file):
    return {}
  raw = _read_file(file, _MAX_INFO_BYTES)
  try:
    text = raw.decode("utf-8").removeprefix("\ufeff")
  except UnicodeDecodeError as e:
    raise UserError(f"{file}: not UTF-8 text (byte 0x{raw[e.start]:02x} at {e.start}); re-encode "
                    "the file as UTF-8.") from None
  info = _json(text, file, _MAX_INFO_DEPTH)
  if not isinstance(info, dict):
    raise UserError(f"{file}: expected a JSON object.")
  return info


def _read_file(file: str, max_bytes: int) -> bytes:
  """The bytes of a small dataset file (``info.json``)."""
  with open_data(file, max_bytes, "this file holds a few settings") as f:
    data = f.read(max_bytes + 1)
  if len(data) > max_bytes:  # it grew since it was opened
    raise UserError(f"{file}: larger than {max_bytes} bytes; this file holds a few settings.")
  return data


def _split_file(path: str, split: str) -> str:
  found = [os.path.join(path, split + ext) for ext in EXTENSIONS
           if os.path.lexists(os.path.join(path, split + ext))]
  if not found:
    raise UserError(f"{path}: missing the {split} split: add {split}.jsonl, {split}.csv or "
                    f"{split}.tsv.")
  if len(found) > 1:
    raise UserError(f"{path}: several files for the {split} split ({found}); keep one.")
  return found[0]


def _read_records(file: str, names: Mapping[str, str],
                  limit: int) -> list[tuple[str, Optional[str], object, int]]:
  """(text, text_pair or None, raw label, line number) per record, read line by line."""
  fix = ("every split is read into memory before training: sample it down to the examples "
         "you need (config.data.max_examples samples after reading), or raise the limit with "
         "config.data.max_file_mb=<MiB>")
  with open_data(file, limit, fix) as f:
    lines = text_lines(f, file, limit)
    rows = _jsonl_rows(file, lines) if file.endswith(".jsonl") else _csv_rows(file, lines, names)
    records = [_record(obj, file, number, names) for obj, number in rows]
  if not records:
    raise UserError(f"{file}: no examples; the file is empty.")
  return records


def _record(obj: dict, file: str, number: int, names: Mapping[str, str]):
  """(text, text_pair or None, raw label, line number) of the row on line ``number``."""
  where = f"{file}:{number}"
  for key in ("text", "label"):
    if obj.get(names[key]) is None:
      others = [k for k in obj if k not in names.values() and obj[k] is not None]
      listed = f" (it has {untrusted.printable(others[:10], 200)})" if others else ""
      raise UserError(f"{where}: missing field {names[key]!r}{listed}; give every record one, "
                      f"or map another field with --config.data.columns.{key}=<field>.")
    if obj[names[key]] == "":
      raise UserError(f"{where}: field {names[key]!r} is empty; give the example its "
                      f"{key}, or remove the line.")
  text_value = obj[names["text"]]
  pair = obj.get(names["text_pair"])
  for key, value in (("text", text_value), ("text_pair", pair)):
    if value is not None:
      _check_text(value, f"{where}: field {names[key]!r}")
      if value and _blank(value):
        raise UserError(f"{where}: field {names[key]!r} holds only spaces or invisible "
                        "characters, nothing to read; give the example its text, or remove "
                        "the line.")
  return (text_value, pair if pair != "" else None,
          _checked_raw_label(obj[names["label"]], where), number)


def _jsonl_rows(file: str, lines):
  """(object, line number) per non-blank line of a JSON Lines file."""
  for number, line in lines:
    if not line.strip():
      continue
    obj = _json(line, f"{file}:{number}", _MAX_RECORD_DEPTH)
    if not isinstance(obj, dict):
      hint = " (a JSON array? write one object per line)" if isinstance(obj, list) else ""
      raise UserError(f"{file}:{number}: expected a JSON object per line{hint}.")
    yield obj, number


def _json(text: str, where: str, max_depth: int):
  """Parsed JSON with the limits of :func:`untrusted.loads` (digits, number sizes, no NaN or
  Infinity), refused when nested deeper than ``max_depth`` (a dataset file is flat) or when an
  object names a key twice (JSON readers keep the last value, silently). One parse: a large
  dataset file has millions of lines."""
  if text.count("[") + text.count("{") > max_depth:  # else it cannot be nested deeper
    nesting = untrusted.depth(text)
    if nesting > max_depth:
      raise UserError(f"{where}: JSON nested {nesting} deep; at most {max_depth} levels are "
                      "expected here.")
  return untrusted.parse(text, where, lambda pairs: _unique_keys(pairs, where))


def _unique_keys(pairs: list[tuple[str, object]], where: str) -> dict:
  """The object of ``pairs`` (a ``json`` object_pairs_hook); a UserError if a key repeats."""
  obj = {}
  for key, value in pairs:
    if key in obj:
      raise UserError(f"{where}: key {untrusted.printable(key, 60)!r} appears twice in one "
                      "object; keep one of them.")
    obj[key] = value
  return obj


def _csv_rows(file: str, lines, names: Mapping[str, str]):
  """(fields by column, line number) per row of a CSV/TSV file; the first row is the header,
  blank lines are skipped, every other row has one field per column."""
  kind = "TSV" if file.endswith(".tsv") else "CSV"
  delimiter, separator = ("\t", "tab") if kind == "TSV" else (",", "comma")
  reader = csv.reader((line for _, line in lines), delimiter=delimiter)
  end = 0  # the last line read without an error
  try:
    header = next(reader, [])
    for key in ("text", "label"):
      if names[key] not in header:
        raise UserError(f"{file}:1: no column {names[key]!r} in the header "
                        f"{untrusted.printable(header, 200)}; name the column or map it with "
                        f"--config.data.columns.{key}=<column>.")
    twice = [c for c in dict.fromkeys(header) if c in names.values() and header.count(c) > 1]
    if twice:
      raise UserError(f"{file}:1: the header {untrusted.printable(header, 200)} has the column "
                      f"{untrusted.printable(twice[0], 60)!r} twice; rename or remove one.")
    end = reader.line_num
    for fields in reader:
      start, end = end + 1, reader.line_num  # a quoted field may hold line breaks
      if not fields:
        continue  # a blank line
      if len(fields) != len(header):
        raise _field_count_error(f"{file}:{end}", f"{file}:{start}", fields, header, separator)
      yield dict(zip(header, fields)), end
  except csv.Error as e:
    raise UserError(f"{file}:{end + 1}: not valid {kind} ({e}); a text may have at "
                    f"most {MAX_TEXT_CHARS} characters.") from None


def _field_count_error(where: str, first_line: str, fields: list[str], header: list[str],
                       separator: str) -> UserError:
  """The error for a CSV/TSV row without one field per column (``where`` the row ends, on
  ``first_line`` it starts)."""
  if len(fields) > len(header):
    return UserError(f"{where}: {len(fields)} fields, but the header has {len(header)} columns; "
                     f"put a text that contains a {separator} in double quotes.")
  missing = untrusted.printable(header[len(fields)], 60)
  if fields[-1].endswith(("\n", "\r")):  # a quoted field that runs to the end of the file
    return UserError(f"{first_line}: missing field {missing!r}: a double quote opened on this "
                     'line is not closed; close it (a quote inside a quoted text is written "").')
  return UserError(f"{where}: missing field {missing!r} ({len(fields)} "
                   f"field{'s' if len(fields) != 1 else ''}, but the header has {len(header)} "
                   f"columns); give every column a field (an empty one is nothing between two "
                   f"{separator}s).")


def _check_text(value, what: str) -> None:
  if not isinstance(value, str):
    raise UserError(f"{what} must be a string, not {type(value).__name__}.")
  if len(value) > MAX_TEXT_CHARS:
    raise UserError(f"{what} has {len(value)} characters; at most {MAX_TEXT_CHARS} are allowed.")
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:
    raise UserError(f"{what} holds {value[e.start]!r} at character {e.start}, which is not "
                    "Unicode text (an unpaired surrogate).") from None


def _blank(text: str) -> bool:
  """Whether a text has nothing a tokenizer keeps: only whitespace, control and format
  characters (such as zero-width spaces)."""
  return all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf") for c in text)


def _checked_raw_label(label, where: str):
  """A label as written: a string (name, id or score), an int or a finite float."""
  if isinstance(label, bool) or not isinstance(label, (str, int, float)):
    raise UserError(f"{where}: label {untrusted.printable(label, 60)} is not a class id, a "
                    "label name or a number.")
  if isinstance(label, str):
    _check_text(label, f"{where}: label")
    if len(label) > MAX_LABEL_CHARS:
      raise UserError(f"{where}: label of {len(label)} characters; at most {MAX_LABEL_CHARS}.")
  elif isinstance(label, float) and not math.isfinite(label):
    raise UserError(f"{where}: label {label} is not a finite number.")
  return label


def _is_score(label) -> bool:
  """Whether a label is written as a number with a fraction (``3.8``, ``"0.25"``)."""
  if isinstance(label, float):
    return not label.is_integer()
  return isinstance(label, str) and bool(_SCORE.fullmatch(label.strip()))


def _class_id(label) -> Optional[int]:
  """The class id a label is written as (``3``, ``3.0``, ``"3"``), or None."""
  if isinstance(label, int):
    return label
  if isinstance(label, float):
    return int(label) if label.is_integer() else None
  return int(label) if _CLASS_ID.fullmatch(label) and len(label) <= 6 else None


def _checked_label_names(names, where: str) -> list[str]:
  if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
    raise UserError(f"{where}: label_names must be a list of label names (non-empty strings).")
  if not 2 <= len(names) <= MAX_CLASSES:
    raise UserError(f"{where}: {len(names)} label_names; a classification task has 2 to "
                    f"{MAX_CLASSES} labels.")
  for name in names:
    _check_text(name, f"{where}: a label name")
    if len(name) > MAX_LABEL_CHARS:
      raise UserError(f"{where}: a label name of {len(name)} characters; at most "
                      f"{MAX_LABEL_CHARS}.")
  if len(set(names)) != len(names):
    twice = sorted({n for n in names if names.count(n) > 1})
    raise UserError(f"{where}: label_names lists {untrusted.printable(twice, 100)} more than "
                    "once; each label needs one name.")
  return names


def _infer_label_names(raw, files) -> list[str]:
  """Label names of a classification task without ``label_names``: ``0..max id`` when every
  label is a class id, else the sorted distinct labels. One pass, nothing kept per record."""
  low = high = first_name = None  # (id, label, file, line) of the lowest and highest class id
  ids = 0
  distinct: set[str] = set()
  for split, records in raw.items():
    for _, _, label, line in records:
      i = _class_id(label)
      if i is None:
        first_name = first_name or (label, files[split], line)
        if len(distinct) <= MAX_CLASSES:
          distinct.add(str(label))
        continue
      ids += 1
      if low is None or i < low[0]:
        low = (i, label, files[split], line)
      if high is None or i > high[0]:
        high = (i, label, files[split], line)
  if first_name is None:
    if low[0] < 0:
      raise UserError(f"{low[2]}:{low[3]}: label {untrusted.printable(low[1], 60)} is negative; "
                      "class ids start at 0. Number the classes from 0, or name them in "
                      'info.json ("label_names": [...]) and write each label as its name, in '
                      'quotes ("-1").')
    if high[0] >= MAX_CLASSES:  # shown as written: 1e300 is a class id of 301 digits
      raise UserError(f"{high[2]}:{high[3]}: label {untrusted.printable(high[1], 60)} is too "
                      f"large: class ids are 0..{MAX_CLASSES - 1}. Number the classes from 0, "
                      'or name them in info.json ("label_names": [...]) and write each label '
                      "as its name, in quotes.")
    names = [str(i) for i in range(high[0] + 1)]
  elif ids:
    label, file, line = first_name
    raise UserError(f"{file}:{line}: label {untrusted.printable(label, 60)!r} is not a class id "
                    "like the other labels (0, 1, ...); write every label as a class id, or "
                    'name the classes in info.json ("label_names": [...])'
                    f"{_regression_hint(label)}.")
  else:
    names = sorted(distinct)
    if len(names) > MAX_CLASSES:
      raise UserError(f"{files['train']}: more than {MAX_CLASSES} different labels; a "
                      f"classification task has at most {MAX_CLASSES} classes.")
  if len(names) < 2:
    raise UserError(f"{os.path.dirname(files['train'])}: a classification task needs at least 2 "
                    f"labels, found {names}.")
  return names


def _to_split(records, kind: str, label_names: list[str], file: str, pair_column: str) -> Split:
  pairs_present = {r[1] is not None for r in records}
  if len(pairs_present) > 1:
    line = next(r[3] for r in records if r[1] is None)
    raise UserError(f"{file}:{line}: no {pair_column!r}, but other lines have one: a sentence-pair "
                    "task needs the second text in every example; give it one, or remove the "
                    "line.")
  index = {name: i for i, name in enumerate(label_names)}
  labels = [_parse_label(label, kind, label_names, index, file, line)
            for _, _, label, line in records]
  dtype = np.float32 if kind == "regression" else np.int32
  return Split([r[0] for r in records], [r[1] for r in records] if True in pairs_present else None,
               np.asarray(labels, dtype=dtype))


def _parse_label(label, kind: str, label_names: list[str], index: Mapping[str, int], file: str,
                 line: int):
  """The class id (``index``: each name's) or the score of a label written on ``line``."""
  if kind == "regression":
    try:
      value = float(label)
    except (ValueError, OverflowError):
      raise UserError(f"{file}:{line}: label {untrusted.printable(label, 60)!r} is not a number "
                      "(regression task).") from None
    if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
      raise UserError(f"{file}:{line}: label {untrusted.printable(label, 60)} is not a finite "
                      "32-bit number (regression task).")
    return value
  if isinstance(label, str) and label in index:
    return index[label]
  as_int = _class_id(label)
  if as_int is not None and 0 <= as_int < len(label_names):
    return as_int
  shown = untrusted.printable(label, 60)
  if as_int is None:
    raise UserError(f"{file}:{line}: label {shown!r} is not in the label set "
                    f"{untrusted.printable(label_names, 200)}{_regression_hint(label)}.")
  raise UserError(f"{file}:{line}: label {shown} is outside the label set: expected 0.."
                  f"{len(label_names) - 1} ({untrusted.printable(', '.join(label_names), 200)}).")


def _regression_hint(label) -> str:
  """A hint for a score in a classification task (its kind comes from the train split)."""
  if not _is_score(label):
    return ""
  return ('; if the labels are scores, declare a regression task in info.json ("task": '
          '"regression")')
