"""Task datasets: JSONL folders, CSV/TSV folders and TensorFlow Datasets names, all validated.

A dataset is named in a config in one of three ways:

* a name such as ``sst2``, looked up as a folder ``<dir>/sst2/`` in ``config.data.dirs``;
* a path to such a folder;
* ``tfds:<name>`` such as ``tfds:glue/rte`` or ``tfds:super_glue/cb`` (downloads on first use).

A folder holds ``train``, ``dev`` and ``test`` splits as ``.jsonl``, ``.csv`` or ``.tsv`` files
and an optional ``info.json`` (``task``: classification|regression, ``label_names``). Records
have ``text``, optional ``text_pair`` and ``label`` (an int class id, a label name, or a float
for regression). CSV/TSV need a header row; other column names are mapped through
``config.data.columns``. Files are read a line at a time (LF, CR LF or CR; UTF-8, an optional
BOM); each is at most ``config.data.max_file_mb`` MiB (default 1024), checked first.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from cold_fusion_tf.data import folder
from cold_fusion_tf.data import reading
from cold_fusion_tf.data import tasks
from cold_fusion_tf.data.folder import load_folder, resolve_dir
from cold_fusion_tf.data.tasks import (DEMO_DATA_DIR, SPLITS, Split, TaskData, check_caps,
                                       check_labels, dataset_id, sample_split)

__all__ = ["DEMO_DATA_DIR", "SPLITS", "Split", "TaskData", "check_caps", "check_labels",
           "dataset_id", "load_folder", "load_task", "resolve_dir", "sample_split"]


def load_task(name: str, dirs: Sequence[str] = (), columns: Mapping[str, str] | None = None,
              max_examples: Mapping[str, int] | None = None,
              max_file_mb: int = reading.DEFAULT_MAX_FILE_MB) -> tasks.TaskData:
  """Loads and validates a dataset given by name, folder (files of at most ``max_file_mb``
  MiB) or ``tfds:`` reference."""
  dataset_id(name)  # a name contributions and reports can use, before any reading
  if max_examples:
    check_caps(max_examples)  # before any reading
  if name.startswith("tfds:"):
    from cold_fusion_tf.data import tfds  # pylint: disable=g-import-not-at-top
    task = tfds.load(name[len("tfds:"):])
  else:
    task = folder.load_folder(folder.resolve_dir(name, dirs), columns or {}, max_file_mb)
  tasks.check_labels(task)  # the data as given, before any cap samples it
  if max_examples:
    for split, cap in max_examples.items():
      task.splits[split] = tasks.sample_split(task.splits[split], cap, split)
    tasks.check_scored_splits(task, "config.data.max_examples")
  return task
