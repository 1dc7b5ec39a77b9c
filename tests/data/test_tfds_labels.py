"""TFDS datasets whose label feature holds plain integers (class ids without names) are
classification tasks, not regression on the ids; float labels stay scores."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from cold_fusion_tf.data import tfds as tfds_source
from cold_fusion_tf.errors import UserError


class _Builder:
  """A prepared TFDS builder of ``train`` and ``test`` splits: texts and ``labels``."""

  def __init__(self, dtype, labels):
    self.info = type("Info", (), {"features": {
        "text": tfds.features.Text(), "label": tfds.features.Tensor(shape=(), dtype=dtype)}})()
    self.labels = labels

  def download_and_prepare(self):
    pass

  def as_dataset(self, split):
    if split not in ("train", "test"):
      raise KeyError(split)
    texts = [f"text {i}".encode() for i in range(len(self.labels))]
    return tf.data.Dataset.from_tensor_slices({"text": texts, "label": self.labels})


def _use(monkeypatch, dtype, labels):
  monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: _Builder(dtype, labels))


def test_integer_labels_without_names_are_classes(monkeypatch):
  # Prepare: ids 0..3, the hidden label -1 on some examples
  _use(monkeypatch, np.int64, np.array([0, 3, 1, 2, -1] * 6, np.int64))
  # Execute
  task = tfds_source.load("fake/intents")
  # Assert: four classes named by their ids; the hidden labels left out
  assert task.kind == "classification" and task.label_names == ["0", "1", "2", "3"]
  assert task.num_outputs == 4 and task.splits["test"].labels.tolist() == [0, 3, 1, 2] * 6
  assert task.splits["train"].labels.dtype == np.int32


def test_float_labels_stay_scores(monkeypatch):
  # Prepare
  _use(monkeypatch, np.float32, np.array([0.5, 3.0, 1.25, 2.0] * 5, np.float32))
  # Execute
  task = tfds_source.load("fake/scores")
  # Assert
  assert task.kind == "regression" and task.label_names == []
  assert task.splits["test"].labels.tolist() == [0.5, 3.0, 1.25, 2.0] * 5


def test_integer_labels_beyond_the_class_limit_are_refused(monkeypatch):
  # Prepare
  _use(monkeypatch, np.int64, np.array([0, 1, 5000] * 4, np.int64))
  # Execute / Assert
  with pytest.raises(UserError, match=r"tfds:fake/ids: a label is 5000, but a task has at most "
                                      r"1000 classes"):
    tfds_source.load("fake/ids")
