"""Task types: a validated dataset (:class:`TaskData`) and its splits, and sampling."""

from __future__ import annotations

import dataclasses
import os
import random
from typing import Optional

import numpy as np

from cold_fusion_tf.errors import UserError
from cold_fusion_tf.store import untrusted
from cold_fusion_tf.store.paths import check_path_part

SPLITS = ("train", "dev", "test")
DEMO_DATA_DIR = os.path.join(os.path.dirname(__file__), "demo")


@dataclasses.dataclass
class Split:
  """One split: parallel lists of texts, optional pair texts, and labels."""
  texts: list[str]
  pairs: Optional[list[str]]
  labels: np.ndarray  # int32 class ids, or float32 scores for regression

  def __len__(self) -> int:
    return len(self.texts)


@dataclasses.dataclass
class TaskData:
  """A validated task: its kind, labels and splits."""
  name: str
  kind: str  # "classification" or "regression"
  label_names: list[str]
  splits: dict[str, Split]
  source: str

  @property
  def num_outputs(self) -> int:
    return 1 if self.kind == "regression" else len(self.label_names)

  @property
  def is_pair(self) -> bool:
    return self.splits["train"].pairs is not None


def check_labels(task: TaskData) -> None:
  """Refuses a task a fine-tune cannot learn from: a classification task whose train split
  holds a single class, a regression task whose train scores are all equal. (A class only dev
  or test holds is allowed: it is scored, and no fine-tune gets it right.)"""
  train = task.splits["train"]
  if task.kind == "regression":
    if len(train) and np.all(train.labels == train.labels[0]):
      raise UserError(f"{task.source}: every score in the train split is "
                      f"{float(train.labels[0]):g}; a regression task needs different scores to "
                      "learn from.")
    check_scored_splits(task)
    return
  seen = set(np.unique(train.labels).tolist())
  if len(seen) < 2:
    name = untrusted.printable(task.label_names[min(seen)], 60) if seen else "none"
    raise UserError(f"{task.source}: the train split holds a single class ({name!r}); a "
                    "classifier needs training examples of at least 2 classes.")


def check_scored_splits(task: TaskData, cap: str = "") -> None:
  """Refuses a regression task whose dev or test scores are all equal (or a single one): its
  metric, Spearman's rank correlation, is undefined there, and a fine-tune would be scored 0
  and kept or compared on nothing. ``cap``: the setting that sampled the splits, if any."""
  if task.kind != "regression":
    return
  for split in ("dev", "test"):
    labels = task.splits[split].labels
    if len(labels) and np.all(labels == labels[0]):
      count = f"its {len(labels)} scores are all" if len(labels) > 1 else "its one score is"
      fix = (f"raise {cap}.{split} (0: all)" if cap else
             f"give the {split} split examples of different scores")
      raise UserError(f"{task.source}: the {split} split cannot be scored: {count} "
                      f"{float(labels[0]):g}, and a regression task is scored by Spearman's rank "
                      f"correlation, which needs different scores; {fix}.")


def dataset_id(name: str) -> str:
  """A path-safe short name for a dataset reference (used for contributor ids and reports)."""
  base = name[len("tfds:"):] if name.startswith("tfds:") else os.path.basename(os.path.normpath(name))
  try:
    return check_path_part(base.replace("/", "."), "Dataset name")
  except UserError as e:
    if name.startswith("tfds:") or base == name:
      raise
    raise UserError(f"{e} Rename the dataset's folder, or link it under such a name.") from None


def check_caps(caps, where: str = "config.data.max_examples") -> dict[str, int]:
  """Caps on examples per split (``{"train": 1000}``; 0: all), checked."""
  if not hasattr(caps, "items"):
    raise UserError(f"{where} must map splits ({', '.join(SPLITS)}) to caps, got {caps!r}.")
  checked = {}
  for split, cap in caps.items():
    if split not in SPLITS:
      raise UserError(f"{where}.{split}: no such split; the splits are {', '.join(SPLITS)}.")
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
      raise UserError(f"{where}.{split}={cap!r}: a cap is a number of examples (0: all).")
    checked[split] = cap
  return checked


def sample_split(split: Split, cap: int, seed: str) -> Split:
  """At most ``cap`` examples (0: all) drawn at random (seeded by ``seed``), in file order.

  A random sample rather than the first ``cap`` lines: some sources are sorted by label, and
  their first lines hold a single class.
  """
  if not cap or len(split) <= cap:
    return split
  keep = sorted(random.Random(f"cold_fusion_tf/{seed}").sample(range(len(split)), cap))
  pick = lambda values: [values[i] for i in keep]  # noqa: E731
  return Split(pick(split.texts), pick(split.pairs) if split.pairs else None,
               split.labels[np.asarray(keep, dtype=np.int64)])
