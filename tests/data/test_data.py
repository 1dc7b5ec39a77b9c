"""Datasets: JSONL, CSV/TSV and TFDS sources; every bad input stops with a precise message."""

import json
import os

import numpy as np
import pytest

from cold_fusion_tf import data
from cold_fusion_tf.training import inputs
from cold_fusion_tf.errors import UserError
import tiny


def _write(folder, files, info=None):
  os.makedirs(folder, exist_ok=True)
  for name, content in files.items():
    mode = "wb" if isinstance(content, bytes) else "w"
    with open(os.path.join(folder, name), mode) as f:
      f.write(content)
  if info is not None:
    with open(os.path.join(folder, "info.json"), "w") as f:
      json.dump(info, f)
  return folder


def _jsonl(records):
  return "".join(json.dumps(r) + "\n" for r in records)


GOOD = _jsonl([{"text": "good", "label": 1}, {"text": "bad", "label": 0}])
INFO = {"task": "classification", "label_names": ["neg", "pos"]}


def test_shipped_jsonl_datasets_load_with_kinds_and_pairs():
  # Execute
  task = data.load_task("rte", dirs=[tiny.DATA])
  # Assert
  assert task.kind == "classification" and task.is_pair
  assert task.label_names == ["entailment", "not_entailment"]
  assert len(task.splits["train"]) == 1000 and task.splits["train"].labels.dtype == np.int32
  # Execute: a regression task, capped at 100 training examples
  stsb = data.load_task("stsb", dirs=[tiny.TEST_DATA], max_examples={"train": 100})
  # Assert
  assert stsb.kind == "regression" and stsb.num_outputs == 1 and len(stsb.splits["train"]) == 100
  assert stsb.splits["train"].labels.dtype == np.float32
  assert 0.0 <= stsb.splits["train"].labels.min() and stsb.splits["train"].labels.max() <= 5.0


def test_csv_and_tsv_with_named_columns_and_label_names(tmp_path):
  # Prepare: CSV files with named columns and label names
  csv_text = "sentence,y\n\"great, really\",pos\nawful,neg\n"
  folder = _write(str(tmp_path / "reviews"), {f"{s}.csv": csv_text for s in data.SPLITS}, INFO)
  # Execute
  task = data.load_task(folder, columns={"text": "sentence", "label": "y"})
  # Assert
  assert task.splits["train"].texts == ["great, really", "awful"]
  assert task.splits["train"].labels.tolist() == [1, 0]
  # Prepare: TSV files with a text pair
  tsv_text = "text\ttext_pair\tlabel\na\tb\t2\nc\td\t0\n"
  folder = _write(str(tmp_path / "pairs"), {f"{s}.tsv": tsv_text for s in data.SPLITS})
  # Execute
  task = data.load_task(folder)
  # Assert
  assert task.is_pair and task.label_names == ["0", "1", "2"]
  assert task.splits["dev"].pairs == ["b", "d"]


@pytest.mark.parametrize("files,message", [
    ({"train.jsonl": GOOD, "dev.jsonl": GOOD}, r"missing the test split: add test.jsonl"),
    ({"train.jsonl": "", "dev.jsonl": GOOD, "test.jsonl": GOOD}, r"train.jsonl: no examples"),
    ({"train.jsonl": GOOD + '{"label": 1}\n', "dev.jsonl": GOOD, "test.jsonl": GOOD},
     r"train.jsonl:3: missing field 'text'"),
    ({"train.jsonl": GOOD, "dev.jsonl": GOOD + '{"text": "x", "label": 7}\n', "test.jsonl": GOOD},
     r"dev.jsonl:3: label 7 is outside the label set: expected 0..1 \(neg, pos\)"),
    ({"train.jsonl": GOOD, "dev.jsonl": GOOD, "test.jsonl": GOOD + '{"text": "x", "label": "meh"}\n'},
     r"test.jsonl:3: label 'meh' is not in the label set"),
    ({"train.jsonl": GOOD.encode() + b'{"text": "caf\xe9", "label": 1}\n', "dev.jsonl": GOOD,
      "test.jsonl": GOOD}, r"train.jsonl:3: not UTF-8 text \(byte 0xe9\)"),
    ({"train.jsonl": "{oops\n", "dev.jsonl": GOOD, "test.jsonl": GOOD},
     r"train.jsonl:1: not valid JSON"),
    ({"train.csv": "sentence,label\nx,1\n", "dev.jsonl": GOOD, "test.jsonl": GOOD},
     r"train.csv:1: no column 'text' in the header \['sentence', 'label'\]"),
])
def test_bad_data_names_file_line_and_fix(tmp_path, files, message):
  # Prepare
  folder = _write(str(tmp_path / "task"), files, INFO)
  # Execute / Assert
  with pytest.raises(UserError, match=message):
    data.load_task(folder)


def test_unknown_dataset_lists_known_ones(tmp_path):
  # Execute / Assert
  with pytest.raises(UserError, match=r"Unknown dataset 'nope'.*Known datasets: .*sst2"):
    data.load_task("nope", dirs=[tiny.DATA])


def test_a_folder_of_many_folders_lists_twenty_and_counts_the_rest(tmp_path):
  # Prepare: 25 folders where datasets are searched
  for i in range(25):
    (tmp_path / f"d{i:02d}").mkdir()
  # Execute
  with pytest.raises(UserError) as raised:
    data.load_task("nope", dirs=[str(tmp_path)])
  # Assert
  assert "Known datasets: d00, d01," in str(raised.value)
  assert "d19 and 5 more." in str(raised.value) and "d20" not in str(raised.value)


@pytest.mark.parametrize("name", ["a b", "", "x\n", "-rm", "caf\u00e9", "a" * 129])
def test_unsafe_dataset_names_are_refused(name):
  # Execute / Assert
  with pytest.raises(UserError, match="is not a safe name"):
    data.load_task(name, dirs=[tiny.DATA])


def test_tfds_source_with_mocked_data():
  # Prepare
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # Execute
  with tfds.testing.mock_data(num_examples=40):
    rte = data.load_task("tfds:glue/rte")
    cb = data.load_task("tfds:super_glue/cb")
    stsb = data.load_task("tfds:glue/stsb")
  # Assert
  assert rte.label_names == ["entailment", "not_entailment"] and rte.is_pair
  assert {k: len(v) for k, v in rte.splits.items()} == {"train": 36, "dev": 4, "test": 40}
  assert cb.label_names == ["entailment", "contradiction", "neutral"] and cb.is_pair
  assert stsb.kind == "regression" and stsb.splits["train"].labels.dtype == np.float32
  assert data.dataset_id("tfds:glue/rte") == "glue.rte"


def test_tokenize_once_and_pad_little():
  # Prepare
  task = data.load_task("sst2", dirs=[tiny.DATA], max_examples={"train": 512})
  # Execute
  encoded = inputs.encode(tiny.bert_tokenizer(), task.splits["train"], max_length=128)
  buckets = inputs.bucket_lengths(128)
  # Assert
  assert buckets == sorted(buckets) and buckets[-1] == 128 and len(buckets) <= 16
  # Execute: batches of similar lengths
  batches = inputs.plan_batches(encoded.lengths, 32, shuffle=True, seed=0)
  # Assert
  assert sorted(np.concatenate(batches).tolist()) == list(range(512))
  # Execute
  grouped = inputs.padding_fraction(encoded, batches, buckets)
  naive = 1 - encoded.lengths.sum() / (128 * len(encoded))
  # Assert
  assert naive > 0.7 and grouped < naive / 2
  # Execute
  features, labels = inputs.pad_batch(encoded, batches[0], buckets, ("input_ids", "attention_mask"))
  width = features["input_ids"].shape[1]
  # Assert
  assert width in buckets and width >= encoded.lengths[batches[0]].max()
  assert features["attention_mask"].sum() == encoded.lengths[batches[0]].sum()
  assert labels.tolist() == task.splits["train"].labels[batches[0]].tolist()


def test_max_examples_samples_both_classes_of_a_label_sorted_file(tmp_path):
  # Prepare: the demo's rotten_tomatoes sorted by label: all negatives, then all positives.
  source = os.path.join(tiny.DATA, "rotten_tomatoes")
  folder = tmp_path / "rotten_tomatoes_sorted"
  folder.mkdir()
  for split in data.SPLITS:
    with open(os.path.join(source, f"{split}.jsonl"), encoding="utf-8") as f:
      lines = sorted(f, key=lambda line: json.loads(line)["label"])
    (folder / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")
  full = data.load_task(str(folder)).splits["train"]
  assert set(full.labels[:400].tolist()) == {0}
  # Execute
  capped = data.load_task(str(folder), max_examples={"train": 400}).splits["train"]
  again = data.load_task(str(folder), max_examples={"train": 400}).splits["train"]
  # Assert: a seeded random sample, in file order, with both classes near half each.
  assert len(capped) == 400 and capped.texts == again.texts
  positions = [full.texts.index(t) for t in capped.texts[:50]]
  assert positions == sorted(positions)
  assert 150 < int((capped.labels == 0).sum()) < 250


@pytest.mark.parametrize("files,message", [
    ({"train.csv": "text,label\na,1\nb,0\nc,1,extra,more\n"},
     r"train.csv:4: 4 fields, but the header has 2 columns; put a text that contains a comma in "
     r"double quotes\.$"),
    ({"train.tsv": "text\tlabel\na\t1\nb\tx\t0\n"},
     r"train.tsv:3: 3 fields, but the header has 2 columns; put a text that contains a tab in "
     r"double quotes\.$"),
    ({"train.csv": "text,label,source\na,1,web\nb,0\n"},
     r"train.csv:3: missing field 'source' \(2 fields, but the header has 3 columns\); give every "
     r"column a field \(an empty one is nothing between two commas\)\.$"),
    ({"train.csv": "text,label\na,1\nonlytext\n"},
     r"train.csv:3: missing field 'label' \(1 field, but the header has 2 columns\)"),
    ({"train.csv": 'text,label\na,1\n"b,0\nc,1\n'},
     r"train.csv:3: missing field 'label': a double quote opened on this line is not closed; "
     r'close it \(a quote inside a quoted text is written ""\)\.$'),
    ({"train.csv": "text,text,label\na,b,1\nc,d,0\n"},
     r"train.csv:1: the header \['text', 'text', 'label'\] has the column 'text' twice; rename or "
     r"remove one\.$"),
    ({"train.jsonl": GOOD + '{"text": "x", "label": 1, "label": 0}\n'},
     r"train.jsonl:3: key 'label' appears twice in one object; keep one of them\.$"),
    ({"train.jsonl": GOOD, "info.json": '{"task": "classification", "task": "regression"}'},
     r"info.json: key 'task' appears twice in one object"),
])
def test_ragged_rows_and_repeated_columns_or_keys_are_refused(tmp_path, files, message):
  # Prepare: the dev and test splits are fine; the file under test would otherwise load with
  # fields dropped or filled in, or with the last of two values.
  folder = _write(str(tmp_path / "task"), {"dev.jsonl": GOOD, "test.jsonl": GOOD, **files})
  # Execute / Assert
  with pytest.raises(UserError, match=message):
    data.load_task(folder)


def test_blank_lines_and_quoted_commas_in_csv_still_load(tmp_path):
  # Prepare
  csv_text = 'text,text_pair,label\n"a, b",x,1\n\n"multi\nline",y,0\n'
  folder = _write(str(tmp_path / "task"), {f"{s}.csv": csv_text for s in data.SPLITS})
  # Execute
  task = data.load_task(folder)
  # Assert
  assert task.splits["train"].texts == ["a, b", "multi\nline"]
  assert task.splits["train"].pairs == ["x", "y"]
  assert task.splits["train"].labels.tolist() == [1, 0]


@pytest.mark.parametrize("label,message", [
    ("1e300", r"train.jsonl:3: label 1e\+300 is too large: class ids are 0..999\."),
    ("-1e300", r"train.jsonl:3: label -1e\+300 is negative; class ids start at 0\."),
])
def test_huge_float_label_is_shown_as_written(tmp_path, label, message):
  # Prepare: class ids without label_names; 1e300 is an integral float of 301 digits.
  train = GOOD + '{"text": "x", "label": %s}\n' % label
  folder = _write(str(tmp_path / "task"), {"train.jsonl": train, "dev.jsonl": GOOD,
                                            "test.jsonl": GOOD})
  # Execute
  with pytest.raises(UserError, match=message) as error:
    data.load_task(folder)
  # Assert
  assert "000000" not in str(error.value) and len(str(error.value)) < 300


_PAIRS = _jsonl([{"text": "a", "text_pair": "b", "label": 1},
                 {"text": "c", "text_pair": "d", "label": 0}])


@pytest.mark.parametrize("files,info,message", [
    ({"train.jsonl": _jsonl([{"text": "a", "label": 1}, {"text": "b", "label": 1}])}, INFO,
     r"task: the train split holds a single class \('pos'\); a classifier needs training "
     r"examples of at least 2 classes"),
    ({"train.jsonl": _jsonl([{"text": "a", "label": 2.5}, {"text": "b", "label": 2.5}])},
     {"task": "regression"}, r"every score in the train split is 2.5; a regression task needs "
     r"different scores"),
    ({"train.jsonl": GOOD + _jsonl([{"text": " \t ", "label": 0}])}, INFO,
     r"train.jsonl:3: field 'text' holds only spaces or invisible characters"),
    ({"train.jsonl": _PAIRS + _jsonl([{"text": "a", "text_pair": "\u200b\n", "label": 0}]),
      "dev.jsonl": _PAIRS, "test.jsonl": _PAIRS}, INFO,
     r"train.jsonl:3: field 'text_pair' holds only spaces or invisible characters"),
    ({"train.jsonl": GOOD + _jsonl([{"text": "", "label": 0}])}, INFO,
     r"train.jsonl:3: field 'text' is empty; give the example its text, or remove the line"),
])
def test_data_a_fine_tune_cannot_learn_from_is_refused(tmp_path, files, info, message):
  # Prepare: good splits, one replaced by a bad one
  folder = _write(str(tmp_path / "task"), {**{f"{s}.jsonl": GOOD for s in data.SPLITS},
                                           **files}, info)
  # Execute / Assert
  with pytest.raises(UserError, match=message):
    data.load_task(folder)


def test_a_class_only_a_cap_leaves_out_of_train_still_loads(tmp_path):
  # Prepare: each class once in train; a cap of one example keeps a single class
  folder = _write(str(tmp_path / "task"), {f"{s}.jsonl": GOOD for s in data.SPLITS}, INFO)
  # Execute: the data is checked as given, before the cap samples it
  task = data.load_task(folder, max_examples={"train": 1})
  # Assert
  assert len(task.splits["train"]) == 1 and task.splits["test"].labels.tolist() == [1, 0]
