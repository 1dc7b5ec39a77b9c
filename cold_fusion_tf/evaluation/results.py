"""The results directory of ``evaluate`` (model recycling): its layout, reading and writing.

A local folder::

  <out>/
    results.jsonl          one line per finished run, appended as runs finish:
                           {"model": sha256 of model.safetensors, "name": "stores/demo@3",
                            "task": "sst2", "task_key": hash of the task's data,
                            "mode": "finetune" | "probe", "recipe_key": hash of the recipe,
                            "seed": 1, "score": 0.912, "test": {...}, "dev": {...},
                            "steps": 62, "best_step": 62, "seconds": 48.3}
    summary.json/.csv/.md  the latest evaluation's tables (probe mode: summary_probe.*)
    gains.png              per-task gains against the reference (probe mode: gains_probe.png)

A run is identified by (model, task, task_key, mode, recipe_key, seed); a later evaluation
of the same weights with the same data and recipe reuses it. Reading needs only the standard
library and numpy, so ``inspect --results`` is quick.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Mapping

import numpy as np

from cold_fusion_tf.errors import UserError
from cold_fusion_tf.store import layout
from cold_fusion_tf.store.backends import local

RESULTS = "results.jsonl"
SUMMARIES = ("summary.md", "summary_probe.md")


def run_id(record: Mapping) -> tuple:
  return (record["model"], record["task"], record["task_key"], record["mode"],
          record["recipe_key"], record["seed"])


class ResultsDir:
  """A local results directory (see the module doc)."""

  def __init__(self, path: str):
    if not path:
      raise UserError("--out is required: a local directory for the results.")
    if "://" in path:
      raise UserError(f"--out={path}: results go to a local directory.")
    if os.path.exists(path) and not os.path.isdir(path):
      raise UserError(f"--out={path} is a file, not a directory.")
    self.given = path
    self.path = os.path.abspath(path)

  def check_writable(self) -> None:
    """Raises UserError unless files can be created in the directory (made for the test if
    missing; nothing is left behind): the evaluate program calls it before any training."""
    local.check_writable_folder(self.path, f"--out={self.given}")

  def file(self, name: str) -> str:
    return os.path.join(self.path, name)

  def _cannot_write(self, name: str, error: OSError) -> UserError:
    return UserError(f"{self.file(name)}: cannot write it ({local.os_reason(error)}); give an "
                     "--out you may write to, on a disk with free space.")

  def records(self, log: Callable[[str], None] = lambda message: None) -> list[dict]:
    """The valid lines of results.jsonl (the first of duplicates); bad lines are skipped."""
    try:
      with open(self.file(RESULTS), encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    except FileNotFoundError:
      return []
    out, seen, bad = [], set(), 0
    for line in lines:
      record = parse_record(line)
      if record is None:
        bad += bool(line.strip())
        continue
      if run_id(record) not in seen:
        seen.add(run_id(record))
        out.append(record)
    if bad:
      log(f"note: {self.file(RESULTS)}: skipped {bad} unreadable line(s).")
    return out

  def append(self, record: dict) -> None:
    """Adds one finished run (one write of one line, synced: a crash loses at most it)."""
    if parse_record(json.dumps(record)) is None:
      raise ValueError(f"not a valid result record: {record!r}")
    try:
      os.makedirs(self.path, exist_ok=True)
      with open(self.file(RESULTS), "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    except OSError as e:
      raise self._cannot_write(RESULTS, e) from None

  def write_text(self, name: str, text: str) -> None:
    """Replaces ``name`` atomically."""
    tmp = self.file(f".{name}.tmp")
    try:
      os.makedirs(self.path, exist_ok=True)
      with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
      os.replace(tmp, self.file(name))
    except OSError as e:
      try:
        os.remove(tmp)
      except OSError:
        pass
      raise self._cannot_write(name, e) from None


def parse_record(line: str) -> dict | None:
  """A result line as a dict, or None if it is not one (truncated, wrong types...)."""
  try:
    record = json.loads(line)
  except ValueError:
    return None
  return record if layout.check_run(record) else None


def describe(results) -> str:
  """What a results directory (a :class:`ResultsDir`) holds, for ``inspect --results``:
  runs per model, mode and recipe, each task's mean score and number of seeds, summaries."""
  if not os.path.isfile(results.file(RESULTS)):
    raise UserError(f"{results.path}: no {RESULTS}; not a results directory of evaluate (yet).")
  notes: list[str] = []
  records = results.records(notes.append)
  lines = [f"results {results.path}: {len(records)} finished run(s)", *notes]
  sets: dict[tuple, dict] = {}
  for r in records:
    entry = sets.setdefault((r["mode"], r["recipe_key"], r["model"]), {"names": set(), "tasks": {}})
    entry["names"].add(_printable(r["name"]))
    task = f"{_printable(r['task'], 40)} (data {_printable(r['task_key'], 8)})"
    entry["tasks"].setdefault(task, []).append(float(r["score"]))
  for (mode, recipe, model), entry in sorted(sets.items()):
    lines.append("")
    lines.append(f"model {_printable(model)[:12]} ({', '.join(sorted(entry['names']))})  "
                 f"mode {_printable(mode)}  recipe {_printable(recipe)[:12]}")
    for task, scores in sorted(entry["tasks"].items()):
      lines.append(f"    {task:<40} {100 * np.mean(scores):6.2f}  ({len(scores)} seed"
                   f"{'s' if len(scores) != 1 else ''})")
  for name in SUMMARIES:
    try:
      with open(results.file(name), encoding="utf-8", errors="replace") as f:
        text = f.read()
    except FileNotFoundError:
      continue
    lines += ["", f"--- {name} ---", _printable_block(text)]
  return "\n".join(lines)


def _printable(text: str, limit: int = 200) -> str:
  return "".join(c if c.isprintable() else "?" for c in str(text))[:limit]


def _printable_block(text: str) -> str:
  return "\n".join(_printable(line, 4000) for line in text.splitlines())
