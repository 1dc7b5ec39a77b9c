"""TensorFlow Datasets as a task source (``tfds:glue/rte``, ``tfds:super_glue/cb``, ...).

Splits follow the model-recycling convention: where a benchmark hides its test labels
(GLUE, SuperGLUE), the official validation split is the test set and the dev set is
min(1000, 10%) of train (seed 0); the rest of train is trained on.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging as py_logging
import urllib.parse

from absl import logging
import numpy as np

from cold_fusion_tf.data.folder import MAX_CLASSES
from cold_fusion_tf.data.tasks import Split, TaskData
from cold_fusion_tf.errors import LimitError, UserError
from cold_fusion_tf.store import untrusted

# Which features hold the first and second text; anything not listed falls back to the
# string features in declaration order.
TEXT_FIELDS = {
    "glue/cola": ("sentence", None), "glue/sst2": ("sentence", None),
    "glue/mrpc": ("sentence1", "sentence2"), "glue/qqp": ("question1", "question2"),
    "glue/stsb": ("sentence1", "sentence2"), "glue/mnli": ("premise", "hypothesis"),
    "glue/qnli": ("question", "sentence"), "glue/rte": ("sentence1", "sentence2"),
    "glue/wnli": ("sentence1", "sentence2"), "super_glue/boolq": ("question", "passage"),
    "super_glue/cb": ("premise", "hypothesis"), "super_glue/rte": ("premise", "hypothesis"),
    "imdb_reviews": ("text", None), "ag_news_subset": ("description", None),
    "yelp_polarity_reviews": ("text", None), "snli": ("premise", "hypothesis"),
    "anli": ("context", "hypothesis"), "esnli": ("premise", "hypothesis"),
}
VALIDATION_SPLIT = {"glue/mnli": "validation_matched", "anli": "validation_r1"}
DOWNLOAD_RETRIES = 4
"""Retries of a download request that fails: tfds's own 10, with pauses that double, give up
after 3.5 minutes on a machine without internet; 4 give up after about 3 seconds."""
_CATALOG = "https://www.tensorflow.org/datasets/catalog"


def load(name: str, data_dir: str | None = None) -> TaskData:
  """Loads a TFDS dataset as a task (downloads and prepares it on first use)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # tfds raises several types for unknown names
    first = (str(e).strip().splitlines() or [""])[0]  # tfds goes on to list every dataset
    first = untrusted.printable(first.split(". ")[0].rstrip("."), 200)
    raise UserError(f"tfds:{name}: not a TensorFlow Datasets name ({first}); see "
                    f"{_CATALOG}/overview.") from e
  _prepare(builder, name)
  features = builder.info.features
  if "label" not in features:
    raise UserError(f"tfds:{name}: has no 'label' feature; only classification and "
                    "regression datasets can be used.")
  label_feature = features["label"]
  label_names = list(getattr(label_feature, "names", []) or [])
  class_ids = not label_names and _integral(label_feature)  # classes without names
  kind = "classification" if label_names or class_ids else "regression"
  text_key, pair_key = _text_fields(name, features)
  validation = VALIDATION_SPLIT.get(name.split(":")[0], "validation")
  train = _read(builder, "train", text_key, pair_key, kind, tfds)
  test = None
  for candidate in (validation, "test"):
    try:
      test = _read(builder, candidate, text_key, pair_key, kind, tfds)
    except (KeyError, ValueError):  # the dataset has no such split
      continue
    if len(test):
      break
  if test is None:
    raise UserError(f"tfds:{name}: needs a validation or test split with labels.")
  if class_ids:
    label_names = _id_names(name, np.concatenate([train.labels, test.labels]))
  dev_size = min(1000, max(1, len(train) // 10))
  order = np.random.default_rng(0).permutation(len(train))
  dev, train = _take(train, order[:dev_size]), _take(train, order[dev_size:])
  for split_name, split in (("train", train), ("dev", dev), ("test", test)):
    if len(split) == 0:
      raise UserError(f"tfds:{name}: the {split_name} split has no labelled examples.")
  return TaskData(name.replace("/", "."), kind, label_names,
                  {"train": train, "dev": dev, "test": test}, f"tfds:{name}")


def _prepare(builder, name: str) -> None:
  """Downloads and prepares a dataset unless that was done before. What tfds prints (a note
  before and after) becomes INFO log records, off stdout; its progress bars stay on stderr.
  Any failure (no network, no disk space, files to download by hand) is one UserError."""
  from tensorflow_datasets.core.download import downloader  # pylint: disable=g-import-not-at-top
  retries = getattr(downloader, "MAX_RETRIES", None)
  pool = py_logging.getLogger("urllib3.connectionpool")  # its retry notes: the error says it
  try:
    if isinstance(retries, int):
      downloader.MAX_RETRIES = min(retries, DOWNLOAD_RETRIES)
    pool.addFilter(_not_a_retry_note)
    with contextlib.redirect_stdout(_LogLines()):
      builder.download_and_prepare()
  except Exception as e:  # pylint: disable=broad-except
    raise _prepare_error(builder, name, e) from e
  finally:
    pool.removeFilter(_not_a_retry_note)
    if isinstance(retries, int):
      downloader.MAX_RETRIES = retries


def _prepare_error(builder, name: str, error: Exception) -> UserError:
  """The error for a dataset that could not be downloaded and prepared: its cause in short,
  and what to do."""
  import requests  # pylint: disable=g-import-not-at-top
  root = str(getattr(builder, "data_dir_root", "~/tensorflow_datasets"))
  request = getattr(error, "request", None)
  if isinstance(error, requests.exceptions.ConnectionError) and request is not None:
    cause = f"cannot connect to {urllib.parse.urlsplit(request.url).hostname}"
  else:
    first = (str(error).strip().splitlines() or [""])[0]
    cause = f"{type(error).__name__}: {first}" if first else type(error).__name__
  cause = untrusted.printable(cause, 200)
  where = f"tfds:{name}: cannot download and prepare it ({cause})"
  if "disk space" in str(error) or getattr(error, "errno", None) == errno.ENOSPC:
    return LimitError(f"{where}; free space in {root}, or set TFDS_DATA_DIR to a folder on a "
                      "larger disk.")
  if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
    return UserError(f"{where}; its files are downloaded by hand: follow {_CATALOG}/"
                     f"{name.split('/')[0].split(':')[0]}.")
  return UserError(f"{where}; on a machine without internet, prepare it elsewhere and copy "
                   f"{root} here, or give a folder dataset.")


def _not_a_retry_note(record: py_logging.LogRecord) -> bool:
  """Whether a urllib3 record is something else than a note that a request is retried."""
  return not str(record.msg).startswith("Retrying")


class _LogLines(io.TextIOBase):
  """A text stream whose lines become INFO log records (for what a library prints)."""

  def __init__(self):
    super().__init__()
    self._partial = ""

  def writable(self) -> bool:
    return True

  def write(self, text: str) -> int:
    lines = (self._partial + text).split("\n")
    self._partial = lines.pop()
    for line in lines:
      if line.strip():
        logging.info("%s", line.rstrip())
    return len(text)


def _integral(feature) -> bool:
  """Whether a label feature holds integers (class ids without names, not scores)."""
  dtype = getattr(feature, "np_dtype", None)
  if dtype is None:
    dtype = getattr(getattr(feature, "dtype", None), "as_numpy_dtype", None)
  try:
    return dtype is not None and np.issubdtype(np.dtype(dtype), np.integer)
  except TypeError:
    return False


def _id_names(name: str, labels: np.ndarray) -> list[str]:
  """Names ``0..max id`` of a label feature of integers (hidden labels, -1, already left out)."""
  high = int(labels.max()) if len(labels) else 0
  if high >= MAX_CLASSES:
    raise UserError(f"tfds:{name}: a label is {high}, but a task has at most {MAX_CLASSES} "
                    f"classes (ids 0 to {MAX_CLASSES - 1}).")
  return [str(i) for i in range(max(high + 1, 2))]


def _text_fields(name, features):
  key = name.split(":")[0]
  if key in TEXT_FIELDS:
    return TEXT_FIELDS[key]
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  strings = [k for k, f in features.items()
             if isinstance(f, tfds.features.Text) or getattr(f, "dtype", None) == "string"]
  if not strings:
    raise UserError(f"tfds:{name}: no text feature found among {list(features)}.")
  return strings[0], (strings[1] if len(strings) > 1 else None)


def _read(builder, split, text_key, pair_key, kind, tfds) -> Split:
  texts, pairs, labels = [], [], []
  for example in tfds.as_numpy(builder.as_dataset(split=split)):
    label = example["label"]
    if kind == "classification" and int(label) < 0:
      continue  # hidden test labels
    texts.append(_decode(example[text_key]))
    if pair_key:
      pairs.append(_decode(example[pair_key]))
    labels.append(label)
  dtype = np.float32 if kind == "regression" else np.int32
  return Split(texts, pairs if pair_key else None, np.asarray(labels, dtype=dtype))


def _decode(value) -> str:
  return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _take(split: Split, index) -> Split:
  return Split([split.texts[i] for i in index],
               [split.pairs[i] for i in index] if split.pairs is not None else None,
               split.labels[index])
