"""Tokenize once, plan epochs by length, and feed replicas through tf.data (real tokenizer and
real data; no model)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

import tiny
from cold_fusion_tf import data
from cold_fusion_tf.training import inputs

TOKENIZER = tiny.bert_tokenizer()
SST2 = data.load_task("sst2", dirs=[tiny.DATA], max_examples={"train": 2000})
TRAIN = inputs.encode(TOKENIZER, SST2.splits["train"], 128)
NAMES = ("input_ids", "attention_mask", "token_type_ids")


class Context:
  """The three fields of tf.distribute.InputContext the pipelines read."""

  def __init__(self, pipelines, pipeline_id, replicas):
    self.num_input_pipelines = pipelines
    self.input_pipeline_id = pipeline_id
    self.num_replicas_in_sync = replicas


def test_encode_matches_the_tokenizer_and_caches(tmp_path):
  # Prepare
  split = SST2.splits["dev"]
  # Execute
  encoded = inputs.encode(TOKENIZER, split, 16, cache_dir=str(tmp_path))
  # Assert
  direct = TOKENIZER(split.texts[3], truncation=True, max_length=16)
  assert list(encoded.row(3)) == direct["input_ids"]
  assert encoded.lengths.max() == 16 and len(encoded) == len(split)
  files = os.listdir(tmp_path)
  assert len(files) == 1 and files[0].endswith(".npz")
  # Execute: the same settings again
  cached = inputs.encode(TOKENIZER, split, 16, cache_dir=str(tmp_path))
  # Assert
  assert np.array_equal(cached.ids, encoded.ids) and np.array_equal(cached.labels, encoded.labels)
  # Execute
  # Other settings are another cache entry.
  inputs.encode(TOKENIZER, split, 32, cache_dir=str(tmp_path))
  # Assert
  assert len(os.listdir(tmp_path)) == 2



def test_a_truncated_cache_file_is_rebuilt(tmp_path):
  # Prepare: a cache file cut short, as a process killed or a disk full while writing leaves it
  split = SST2.splits["dev"]
  encoded = inputs.encode(TOKENIZER, split, 24, cache_dir=str(tmp_path))
  (name,) = os.listdir(tmp_path)
  with open(tmp_path / name, "r+b") as f:
    f.truncate(50)
  inputs._KEPT.clear()  # pylint: disable=protected-access  # as a new process: read the file
  # Execute
  again = inputs.encode(TOKENIZER, split, 24, cache_dir=str(tmp_path))
  # Assert: tokenized again (not a zipfile.BadZipFile), and the cache holds a whole file again
  assert np.array_equal(again.ids, encoded.ids) and np.array_equal(again.labels, encoded.labels)
  assert os.path.getsize(tmp_path / name) > 50

def test_bucket_lengths():
  # Execute / Assert
  assert inputs.bucket_lengths(40) == [8, 16, 24, 32, 40]
  assert inputs.bucket_lengths(128, np.arange(1, 101), num_buckets=4) == [32, 56, 80, 104, 128]
  few = inputs.bucket_lengths(128, TRAIN.lengths, num_buckets=4)
  assert len(few) <= 5 and few[-1] == 128 and all(b % 8 == 0 for b in few)


@pytest.mark.parametrize("static, per_execution", [(False, 1), (True, 4)])
def test_epoch_plan_covers_each_example_once_with_little_padding(static, per_execution):
  # Prepare
  buckets = inputs.bucket_lengths(128, TRAIN.lengths, 6 if static else 0)
  # Execute
  plan = inputs.plan_epoch(TRAIN.lengths, 32, buckets, seed=3, static_shapes=static,
                           steps_per_execution=per_execution)
  # Assert
  assert plan.batches.shape == (len(TRAIN) // 32, 32)
  assert len(np.unique(plan.batches)) == plan.batches.size  # no example twice
  assert all(TRAIN.lengths[b].max() <= w for b, w in zip(plan.batches, plan.widths))
  assert set(plan.widths) <= set(buckets)
  # Length grouping: far less padding than random batches padded to their longest example.
  rng = np.random.default_rng(0)
  random = rng.permutation(len(TRAIN))[:plan.batches.size].reshape(plan.batches.shape)
  random_padding = 1 - TRAIN.lengths[random].sum() / (TRAIN.lengths[random].max(1) * 32).sum()
  assert random_padding > 0.4
  assert inputs.padding_fraction(TRAIN.lengths, plan) < 0.5 * random_padding
  # Execute: the same seed again
  again = inputs.plan_epoch(TRAIN.lengths, 32, buckets, seed=3, static_shapes=static,
                            steps_per_execution=per_execution)
  # Assert
  assert np.array_equal(again.batches, plan.batches)  # a resumed run sees the same order
  # Execute: another seed
  other = inputs.plan_epoch(TRAIN.lengths, 32, buckets, seed=4, static_shapes=static)
  # Assert
  assert not np.array_equal(other.batches, plan.batches)
  if static:  # steps of one width come in runs of up to steps_per_execution
    runs, step = [], 0
    while step < len(plan):
      runs.append(plan.run_end(step) - step)
      step = plan.run_end(step)
    assert max(runs) >= 2 and sum(runs) == len(plan)
    assert np.array_equal(plan.groups, plan.widths)
  else:
    assert plan.run_end(0) == len(plan)


def _replica_batches(encoded, plan, steps, width, context, with_index=False):
  fn = inputs.replica_dataset_fn(encoded, plan, steps, NAMES, tf.int32, width=width,
                                 with_index=with_index)
  return list(fn(context).as_numpy_iterator())


def test_replicas_get_their_slices_of_each_global_batch():
  # Prepare
  buckets = inputs.bucket_lengths(128)
  plan = inputs.plan_epoch(TRAIN.lengths, 16, buckets, seed=0, static_shapes=False)
  steps = np.arange(3)
  # Execute
  # 2 pipelines (workers) x 2 local replicas: pipeline 1 feeds replicas 2 and 3.
  got = _replica_batches(TRAIN, plan, steps, None, Context(2, 1, 4))
  # Assert
  assert len(got) == 6
  for k, (features, labels) in enumerate(got):
    step, replica = divmod(k, 2)
    rows = plan.batches[step][(2 + replica) * 4:(3 + replica) * 4]
    assert features["input_ids"].shape == (4, plan.widths[step])
    assert np.array_equal(labels, TRAIN.labels[rows])
    for r, i in enumerate(rows):
      n = TRAIN.lengths[i]
      assert np.array_equal(features["input_ids"][r, :n], TRAIN.row(i))
      assert (features["input_ids"][r, n:] == TRAIN.pad_id).all()
      assert features["attention_mask"][r].sum() == n and features["attention_mask"][r, :n].all()
      assert np.array_equal(features["token_type_ids"][r, :n], TRAIN.row_types(i))


def test_static_width_datasets_have_fully_static_shapes():
  # Prepare
  buckets = inputs.bucket_lengths(128, TRAIN.lengths, 4)
  plan = inputs.plan_epoch(TRAIN.lengths, 16, buckets, seed=0, static_shapes=True,
                           steps_per_execution=4)
  width = int(plan.widths[0])
  steps = np.flatnonzero(plan.groups == width)
  fn = inputs.replica_dataset_fn(TRAIN, plan, steps, NAMES, tf.int32, width=width)
  # Execute
  spec = fn(Context(1, 0, 2)).element_spec
  # Assert
  assert spec[0]["input_ids"].shape == (8, width) and spec[1].shape == (8,)


def test_eval_plan_pads_with_empty_rows():
  # Prepare
  dev = inputs.encode(TOKENIZER, SST2.splits["dev"], 128)
  buckets = inputs.bucket_lengths(128)
  # Execute / Assert: with and without static shapes
  for static in (False, True):
    plan = inputs.eval_plan(dev.lengths, 24, buckets, static)
    real = plan.batches[plan.batches >= 0]
    assert sorted(real) == list(range(len(dev)))  # every example exactly once
    steps = np.arange(len(plan))
    width = None
    if static:
      width = int(plan.widths[-1])
      steps = np.flatnonzero(plan.widths == width)
    got = _replica_batches(dev, plan, steps, width, Context(1, 0, 1), with_index=True)
    for (features, _), step in zip(got, steps):
      assert np.array_equal(features["index"], plan.batches[step])
      padding = features["index"] < 0
      assert (features["attention_mask"][padding] == 0).all()
      assert (features["input_ids"][padding] == dev.pad_id).all()


def test_training_targets_standardize_regression_scores_only():
  # Prepare
  scores = inputs.Encoded(TRAIN.ids, TRAIN.types, TRAIN.lengths,
                          np.linspace(0.0, 5.0, len(TRAIN)).astype(np.float32), TRAIN.pad_id)
  same = inputs.Encoded(TRAIN.ids, TRAIN.types, TRAIN.lengths,
                        np.full(len(TRAIN), 3.5, np.float32), TRAIN.pad_id)
  # Execute
  standardized = inputs.training_targets(scores, "regression")
  centred = inputs.training_targets(same, "regression")
  classes = inputs.training_targets(TRAIN, "classification")
  # Assert
  assert standardized.labels.dtype == np.float32
  assert abs(float(standardized.labels.mean())) < 1e-6
  assert float(standardized.labels.std()) == pytest.approx(1.0, abs=1e-6)
  assert np.array_equal(np.argsort(standardized.labels, kind="stable"),
                        np.argsort(scores.labels, kind="stable"))
  assert scores.labels[0] == 0.0 and scores.labels[-1] == 5.0  # the input is left as it was
  assert np.array_equal(standardized.offsets, scores.offsets)
  assert np.array_equal(centred.labels, np.zeros(len(TRAIN), np.float32))
  assert classes is TRAIN
