"""Dataset files of unusual but legitimate kinds load as written; broken or hostile ones (too
large, one endless line, links to nothing, splits that cannot be scored) stop with one message
that names the file and says what to do, before anything large is read."""

import json
import os

import numpy as np
import pytest

from cold_fusion_tf import data
from cold_fusion_tf.configs import checks
from cold_fusion_tf.configs import defaults
from cold_fusion_tf.data import reading
from cold_fusion_tf.errors import UserError


def _jsonl(records) -> str:
  return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


GOOD = _jsonl([{"text": "good", "label": 1}, {"text": "bad", "label": 0}])


def _folder(root, files, info=None) -> str:
  """A dataset folder: good jsonl splits, with ``files`` (name: text, bytes or a function
  that makes the file at its path) replacing or adding to them."""
  folder = os.path.join(str(root), "task")
  os.makedirs(folder, exist_ok=True)
  files = {**{f"{s}.jsonl": GOOD for s in data.SPLITS if not any(
      n.startswith(s + ".") for n in files)}, **files}
  for name, content in files.items():
    path = os.path.join(folder, name)
    if callable(content):
      content(path)
    elif isinstance(content, bytes):
      with open(path, "wb") as f:
        f.write(content)
    else:
      with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(content)
  if info is not None:
    with open(os.path.join(folder, "info.json"), "w", encoding="utf-8") as f:
      json.dump(info, f)
  return folder


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085"])
def test_unicode_line_separators_inside_a_jsonl_text_are_text(tmp_path, separator):
  # Prepare: JSON allows these characters unescaped in a string (json.dumps with
  # ensure_ascii=False writes them so); only LF, CR LF and CR end a line.
  train = GOOD + _jsonl([{"text": f"one{separator}two", "label": 1}]) + '{"text": 5, "label": 1}\n'
  folder = _folder(tmp_path, {"train.jsonl": train})
  # Execute / Assert: the bad record is named on its own line, the fourth
  with pytest.raises(UserError, match=r"train.jsonl:4: field 'text' must be a string"):
    data.load_task(folder)
  # Prepare
  folder = _folder(tmp_path, {"train.jsonl": GOOD + _jsonl([{"text": f"one{separator}two",
                                                               "label": 1}])})
  # Execute
  task = data.load_task(folder)
  # Assert
  assert task.splits["train"].texts == ["good", "bad", f"one{separator}two"]
  assert task.splits["train"].labels.tolist() == [1, 0, 1]


def test_line_breaks_bom_and_quoted_newlines_of_every_kind_load(tmp_path):
  # Prepare: CR-only JSONL with a BOM; CSV with a BOM, CR LF rows and a quoted CR LF.
  files = {"train.jsonl": "\ufeff" + GOOD.replace("\n", "\r"),
           "dev.csv": '\ufefftext,label\r\n"two\r\nlines",1\r\nbad,0\r\n',
           "test.tsv": "text\tlabel\r\nsome \u2028 thing\t1\r\n\r\nbad\t0"}
  folder = _folder(tmp_path, files)
  # Execute
  task = data.load_task(folder)
  # Assert
  assert task.splits["train"].texts == ["good", "bad"]
  assert task.splits["dev"].texts == ["two\r\nlines", "bad"]
  assert task.splits["test"].texts == ["some \u2028 thing", "bad"]
  assert [task.splits[s].labels.tolist() for s in data.SPLITS] == [[1, 0]] * 3


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path):
  # Prepare: a sparse file of 64 MiB (nothing but NUL bytes), the limit at 16 MiB
  def sparse(path):
    with open(path, "wb") as f:
      f.truncate(64 << 20)
  folder = _folder(tmp_path, {"train.jsonl": sparse})
  # Execute
  with pytest.raises(UserError) as raised:
    data.load_task(folder, max_file_mb=16)
  # Assert
  message = str(raised.value)
  assert message.startswith(f"{folder}/train.jsonl: 64.0 MiB, larger than the 16.0 MiB"), message
  assert "config.data.max_file_mb=<MiB>" in message and "max_examples" in message
  # Execute: the limit raised, the file is read (and is no JSON)
  with pytest.raises(UserError, match=r"train.jsonl:1: a line of more than 16.0 MiB; a record "
                                      r"holds at most 100000 characters per text"):
    data.load_task(folder, max_file_mb=100)


@pytest.mark.parametrize("value", [0, -5, 1 << 31])
def test_a_bad_size_limit_is_named(value):
  # Prepare
  config = defaults.get_config()
  config.data.max_file_mb = value
  # Execute / Assert
  with pytest.raises(UserError, match=rf"config.data.max_file_mb={value!r}: expected an integer"):
    checks.check(config)


@pytest.mark.parametrize("ext,header", [("jsonl", ""), ("csv", "text,label\n")])
def test_one_endless_line_is_refused_at_the_limit(tmp_path, monkeypatch, ext, header):
  # Prepare: a line of 3 MiB where at most 1 MiB is allowed
  monkeypatch.setattr(reading, "MAX_LINE_BYTES", 1 << 20)
  line = ('{"text": "x", "label": 1, "meta": "' + "y" * (3 << 20) + '"}\n' if ext == "jsonl"
          else "y" * (3 << 20) + ",1\n")
  folder = _folder(tmp_path, {f"train.{ext}": header + "a,0\n" * bool(header) + line})
  # Execute / Assert
  where = "3" if header else "1"
  with pytest.raises(UserError, match=rf"train.{ext}:{where}: a line of more than 1.0 MiB"):
    data.load_task(folder)


def test_a_link_to_nothing_is_named_as_such(tmp_path):
  # Prepare
  folder = _folder(tmp_path, {"test.jsonl": lambda p: os.symlink("/no/such/file.jsonl", p)})
  # Execute / Assert: not "missing the test split"
  with pytest.raises(UserError, match=r"test.jsonl: a symbolic link to /no/such/file.jsonl, "
                                      r"which does not exist"):
    data.load_task(folder)
  # Prepare: info.json links to nothing (it would be ignored, and the labels inferred)
  folder = _folder(tmp_path / "other", {"info.json": lambda p: os.symlink("/no/info.json", p)})
  # Execute / Assert
  with pytest.raises(UserError, match=r"info.json: a symbolic link to /no/info.json"):
    data.load_task(folder)


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
  # Prepare
  folder = _folder(tmp_path, {"dev.jsonl": os.mkfifo})
  # Execute / Assert
  with pytest.raises(UserError, match=r"dev.jsonl: not a regular file"):
    data.load_task(folder)


SCORES = _jsonl([{"text": "a", "label": 0.5}, {"text": "b", "label": 2.5},
                 {"text": "c", "label": 4.0}])


@pytest.mark.parametrize("split,records,shown", [
    ("dev", [{"text": "a", "label": 2.0}, {"text": "b", "label": 2.0}], "its 2 scores are all 2"),
    ("test", [{"text": "a", "label": 1.5}], "its one score is 1.5"),
])
def test_a_regression_split_that_cannot_be_ranked_is_refused(tmp_path, split, records, shown):
  # Prepare: Spearman's correlation is undefined for equal scores (it was reported as 0)
  folder = _folder(tmp_path, {"train.jsonl": SCORES, "dev.jsonl": SCORES, "test.jsonl": SCORES,
                              f"{split}.jsonl": _jsonl(records)}, {"task": "regression"})
  # Execute / Assert
  with pytest.raises(UserError, match=rf"task: the {split} split cannot be scored: {shown}, and a "
                                      r"regression task is scored by Spearman's rank correlation"
                                      rf".*give the {split} split examples of different scores"):
    data.load_task(folder)


def test_a_cap_that_leaves_one_regression_score_names_the_cap(tmp_path):
  # Prepare
  folder = _folder(tmp_path, {f"{s}.jsonl": SCORES for s in data.SPLITS}, {"task": "regression"})
  # Execute / Assert
  with pytest.raises(UserError, match=r"the dev split cannot be scored: its one score is .*; "
                                      r"raise config.data.max_examples.dev \(0: all\)"):
    data.load_task(folder, max_examples={"dev": 1})
  # Execute: two examples of different scores are enough
  task = data.load_task(folder, max_examples={"dev": 2, "test": 2})
  # Assert
  assert len(task.splits["dev"]) == 2 and len(set(task.splits["dev"].labels.tolist())) == 2


def test_a_missing_second_text_names_the_column_and_the_fix(tmp_path):
  # Prepare: a CSV pair task whose second column is named "hypothesis"
  csv_text = "premise,hypothesis,label\na,b,1\nc,,0\n"
  folder = _folder(tmp_path, {f"{s}.csv": csv_text for s in data.SPLITS})
  # Execute / Assert
  with pytest.raises(UserError, match=r"train.csv:3: no 'hypothesis', but other lines have one: "
                                      r"a sentence-pair task needs the second text in every "
                                      r"example; give it one, or remove the line\.$"):
    data.load_task(folder, columns={"text": "premise", "text_pair": "hypothesis"})


def test_scores_in_a_classification_task_say_how_to_declare_regression(tmp_path):
  # Prepare: whole scores in train (read as class ids), a fraction in dev
  dev = _jsonl([{"text": "a", "label": 1}, {"text": "b", "label": 2.5}])
  folder = _folder(tmp_path, {"dev.jsonl": dev})
  # Execute / Assert
  with pytest.raises(UserError, match=r"dev.jsonl:2: label '2.5' is not a class id like the "
                                      r".*; if the labels are scores, declare a regression task "
                                      r'in info.json \("task": "regression"\)\.$'):
    data.load_task(folder)


def test_negative_class_ids_say_how_to_name_them_and_the_fix_works(tmp_path):
  # Prepare
  records = [{"text": "a", "label": -1}, {"text": "b", "label": 0}, {"text": "c", "label": 1}]
  folder = _folder(tmp_path, {f"{s}.jsonl": _jsonl(records) for s in data.SPLITS})
  # Execute / Assert
  with pytest.raises(UserError, match=r'label -1 is negative; .* write each label as its name, '
                                      r'in quotes \("-1"\)'):
    data.load_task(folder)
  # Prepare: the fix the message gives
  named = [dict(r, label=str(r["label"])) for r in records]
  folder = _folder(tmp_path / "fixed", {f"{s}.jsonl": _jsonl(named) for s in data.SPLITS},
                   {"label_names": ["-1", "0", "1"]})
  # Execute
  task = data.load_task(folder)
  # Assert
  assert task.splits["test"].labels.tolist() == [0, 1, 2]


def test_many_classes_by_name_map_to_their_sorted_ids(tmp_path):
  # Prepare: 150 intents named in the data, in an order that is not the sorted one
  records = [{"text": f"text {i}", "label": f"intent_{(i * 7) % 150:03d}"} for i in range(300)]
  folder = _folder(tmp_path, {f"{s}.jsonl": _jsonl(records) for s in data.SPLITS})
  # Execute
  task = data.load_task(folder)
  # Assert
  assert task.num_outputs == 150 and task.label_names[:2] == ["intent_000", "intent_001"]
  train = task.splits["train"]
  assert [task.label_names[i] for i in train.labels] == [r["label"] for r in records]
  assert train.labels.dtype == np.int32


def test_a_folder_whose_name_cannot_name_contributions_is_refused_before_reading(tmp_path):
  # Prepare: a folder with a space in its name; its train split would not even load
  folder = _folder(tmp_path, {"train.jsonl": "{broken\n"})
  renamed = os.path.join(str(tmp_path), "my data")
  os.rename(folder, renamed)
  # Execute / Assert
  with pytest.raises(UserError, match=r"Dataset name 'my data' is not a safe name: .* Rename the "
                                      r"dataset's folder, or link it under such a name\.$"):
    data.load_task(renamed)


def test_a_record_with_its_text_under_another_key_names_the_keys_and_the_mapping(tmp_path):
  # Prepare: a dataset exported with a "sentence" column
  records = _jsonl([{"idx": 0, "sentence": "a", "label": 1}, {"idx": 1, "sentence": "b",
                                                             "label": 0}])
  folder = _folder(tmp_path, {f"{s}.jsonl": records for s in data.SPLITS})
  # Execute / Assert
  with pytest.raises(UserError, match=r"train.jsonl:1: missing field 'text' \(it has \['idx', "
                                      r"'sentence'\]\); give every record one, or map another "
                                      r"field with --config.data.columns.text=<field>\.$"):
    data.load_task(folder)
  # Execute: the mapping the message names
  task = data.load_task(folder, columns={"text": "sentence"})
  # Assert
  assert task.splits["dev"].texts == ["a", "b"]


def test_label_names_in_a_regression_task_are_refused(tmp_path):
  # Prepare
  folder = _folder(tmp_path, {f"{s}.jsonl": SCORES for s in data.SPLITS},
                   {"task": "regression", "label_names": ["low", "high"]})
  # Execute / Assert
  with pytest.raises(UserError, match=r"info.json: label_names name classes, but the task is "
                                      r"regression \(scores\); remove label_names"):
    data.load_task(folder)


@pytest.mark.parametrize("content,message", [
    (lambda: __import__("gzip").compress(GOOD.encode()),
     r"train.jsonl:1: not UTF-8 text \(byte 0x8b\); it is a gzip file: decompress it\.$"),
    (lambda: GOOD.encode("utf-16"),
     r"train.jsonl:1: not UTF-8 text \(byte 0xff\); it is UTF-16 text: re-encode the file as "
     r"UTF-8\.$"),
    (lambda: GOOD.encode() + "caf\u00e9".encode("latin-1") + b"\n",
     r"train.jsonl:3: not UTF-8 text \(byte 0xe9\); re-encode the file as UTF-8\.$"),
])
def test_bytes_that_are_not_utf8_say_what_the_file_is(tmp_path, content, message):
  # Prepare
  folder = _folder(tmp_path, {"train.jsonl": content()})
  # Execute / Assert
  with pytest.raises(UserError, match=message):
    data.load_task(folder)


def test_more_classes_than_the_limit_are_refused_by_count(tmp_path):
  # Prepare: 1,200 different label names
  records = _jsonl([{"text": f"t{i}", "label": f"class {i}"} for i in range(1200)])
  folder = _folder(tmp_path, {f"{s}.jsonl": records for s in data.SPLITS})
  # Execute / Assert
  with pytest.raises(UserError, match=r"train.jsonl: more than 1000 different labels; a "
                                      r"classification task has at most 1000 classes\.$"):
    data.load_task(folder)


@pytest.mark.parametrize("columns,message", [
    ({"text": "label"}, r"config.data.columns: text and label both read the column 'label'"),
    ({"text": "s", "text_pair": "s"}, r"text and text_pair both read the column 's'"),
])
def test_two_fields_read_from_one_column_are_refused(tmp_path, columns, message):
  # Prepare: the labels would be read as texts, or every pair would be a text twice
  folder = _folder(tmp_path, {})
  # Execute / Assert
  with pytest.raises(UserError, match=message + r"; map each field to its own column"):
    data.load_task(folder, columns=columns)
