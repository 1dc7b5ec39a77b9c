"""Every program on bad input: one `error:` line naming the problem, exit status 2, no
traceback, nothing written. Flags and config values are checked before any library is
loaded; dataset files are checked line by line before any training."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cold_fusion_tf import data
from cold_fusion_tf.errors import UserError
import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_PROGRAMS = ("train", "fuse", "run", "evaluate", "export", "inspect", "init")
STORE_PROGRAMS = CONFIG_PROGRAMS + ("rollback", "keys")


def _run(command, *args, cwd=REPO, timeout=300):
  """A program (``cold_fusion_tf.<command>``) or, for a list, that command line."""
  argv = command if isinstance(command, list) else [sys.executable, "-m",
                                                    f"cold_fusion_tf.{command}"]
  env = tiny.env()
  return subprocess.run([*argv, *args], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout)


def _assert_one_error(result, *fragments):
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
  for fragment in fragments:
    assert fragment in errors[0], errors[0]
  return errors[0]


def _files(root) -> list[str]:
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, _, names in os.walk(root) for f in names)


@pytest.fixture
def place(tmp_path):
  """Paths a program could write to, all inside an empty folder (checked afterwards)."""
  root = tmp_path / "place"
  root.mkdir()
  return root


@pytest.mark.parametrize("program", CONFIG_PROGRAMS)
@pytest.mark.parametrize("args,fragments", [
    (["--config.fusion.bogus=1"], ["--config.fusion.bogus: config.fusion has no field 'bogus'",
                                   "min_contributions"]),
    (["--config=/no/such/config.py"], ["--config=/no/such/config.py", "does not exist"]),
    (["--config=no_such_config"], ["not a shipped config's name", "demo"]),
    (["--config.fusion.min_contributions=abc"], ["--config.fusion.min_contributions=abc",
                                                "invalid literal for int()"]),
    (["--config.data.max_examples.train=-1"], ["config.data.max_examples.train=-1",
                                              "a cap is a number of examples"]),
])
def test_bad_config_in_every_program(program, args, fragments, place):
  # Prepare: every path a program writes to lies in `place`.
  paths = [f"--store={place / 'store'}"]
  paths += {"evaluate": [f"--out={place / 'out'}"], "export": [f"--out={place / 'out'}"],
            "train": [f"--workdir={place / 'work'}", "--config.task=sst2"]}.get(program, [])
  # Execute
  result = _run(program, *paths, *args)
  # Assert
  _assert_one_error(result, *fragments)
  assert _files(place) == [] and os.listdir(place) == []


@pytest.mark.parametrize("program", STORE_PROGRAMS)
def test_a_file_where_a_folder_is_expected(program, place):
  # Prepare
  passwd = place / "passwd"
  passwd.write_text("root:x:0:0\n")
  # Execute
  results = [_run(program, f"--store={passwd}"), _run(program, f"--store={passwd}/store")]
  # Assert
  _assert_one_error(results[0], f"--store={passwd} is a file, not a folder")
  _assert_one_error(results[1], f"is inside the file {passwd}")
  assert _files(place) == ["passwd"] and passwd.read_text() == "root:x:0:0\n"


@pytest.mark.parametrize("program,args,fragment", [
    ("train", ["--config.recipe.batch_size=0"], "config.recipe.batch_size=0"),
    ("train", ["--config.recipe.learning_rate=nan"], "expected a finite number"),
    ("run", ["--config.seed=-1"], "config.seed=-1: expected an integer in 0..2147483647"),
    ("train", ["--config.recipe.seed=99999999999"], "config.recipe.seed=99999999999: expected"),
    ("run", ["--config.iterations=10000000"], "config.iterations=10000000: expected an integer "
     "in 0..999999"),
    ("run", ["--config.eval.seeds=0"], "config.eval.seeds=0: expected an integer in 1.."),
    ("run", ["--config.pool=5"], "config.pool: 5 is not a dataset name"),
    ("run", ["--config.data.columns.bogus=x"], "config.data.columns has no field 'bogus'"),
    ("run", ["--config.data.columns.text="], "config.data.columns.text='': expected a column"),
    ("init", ["--config.model.source="], "config.model.source='': expected a non-empty"),
    ("fuse", ["--config.fusion.method=bogus"], "Unknown fusion method 'bogus'"),
    ("fuse", ["--config.iterations=1e3"], "--config.iterations=1e3"),
    ("fuse", ["--bogus_flag=1"], "Unknown command line flag 'bogus_flag'"),
    ("inspect", ["stray"], "unexpected argument(s) stray"),
    ("keys", ["stray"], "unexpected argument(s) stray"),
    ("keys", ["--private_key=k.key"], "--id is required"),
    ("init", ["--config.model.body=bogus"], "--config.model.body='bogus' is not one of"),
    ("fuse", ["--config.model.body=keras_hub", "--config.model.backend=torch"],
     "--config.model.backend='torch' is not one of tensorflow, jax"),
    ("export", ["--license=MIT License"], "--license"),
    ("export", ["--sequence_length=-5"], "--sequence_length=-5"),
    ("evaluate", ["--seeds=-1"], "--seeds=-1"),
    ("train", ["--config.contributor_id=../../etc"], "Contributor id '../../etc' is not a safe"),
    ("run", ["--config.eval.max_train_examples=-1"],
     "config.eval.max_train_examples=-1: expected an integer in 0.."),
    ("run", ["--config.eval.tasks=bogus"], "config.eval.tasks='bogus': bogus is not in"),
    ("evaluate", ["--config.eval.recipe.learning_rate=0"],
     "config.eval.recipe.learning_rate=0.0 is out of range: expected > 0.0"),
    ("train", ["--config.recipe.learning_rate=0"],
     "config.recipe.learning_rate=0.0 is out of range: expected > 0.0"),
    ("run", ["--config.contributors_per_iteration=5"],
     "config.contributors_per_iteration=5 exceeds the pool of 4 datasets"),
    ("run", ["--config.heldout=('rte',)"],
     "dataset(s) rte both in config.pool and in config.heldout"),
])
def test_bad_values_are_refused_before_any_work(program, args, fragment, place):
  # Prepare
  paths = {"evaluate": [f"--out={place / 'out'}"], "export": [f"--out={place / 'out'}"],
           "train": [f"--workdir={place / 'work'}", "--config.task=sst2"],
           "keys": []}.get(program, [])
  # Execute
  result = _run(program, f"--store={place / 'store'}", *paths, *args)
  # Assert
  _assert_one_error(result, fragment)
  assert os.listdir(place) == []


@pytest.mark.parametrize("body,status,line", [
    ("def get_config():\n  return\n", 2, "error: --config={config}: get_config() returned None; "
     "it returns an ml_collections.ConfigDict (see configs/demo.py)."),
    ("import sys\ndef get_config():\n  sys.exit(3)\n", 2, "error: --config={config}: the "
     "config file ended the program (sys.exit(3)) while loading; its get_config() should "
     "return the config."),
    ("def get_config():\n  raise KeyboardInterrupt\n", 130, "interrupted"),
])
def test_config_files_that_return_nothing_exit_or_are_interrupted(body, status, line, place,
                                                                   tmp_path):
  # Prepare
  config = tmp_path / "my_config.py"
  config.write_text(body)
  # Execute
  result = _run("evaluate", f"--config={config}", f"--store={place / 'store'}",
                f"--out={place / 'out'}")
  # Assert: that one line and nothing else (no library note, no traceback)
  assert result.returncode == status
  assert result.stderr.splitlines() == [line.format(config=config)]
  assert os.listdir(place) == []


@pytest.mark.parametrize("body,fragment", [
    ("def get_config():\n  raise ValueError('boom')\n", "fails to load: ValueError: boom"),
    ("def get_config(:\n", "fails to load: SyntaxError"),
    ("x = 1\n", "defines no get_config() function"),
    ("def get_config():\n  return 5\n", "get_config() returned int"),
    ("def get_config():\n  return {'model': {'source': 1}}\n", "get_config() returned dict"),
    ("import ml_collections\ndef get_config():\n  return ml_collections.ConfigDict()\n",
     "--config lacks config.contributor_id, config.contributors_per_iteration, "),
    ("from cold_fusion_tf.configs import demo\ndef get_config():\n  c = demo.get_config()\n"
     "  del c.fusion\n  del c.eval['seeds']\n  return c\n",
     "--config lacks config.eval.seeds, config.fusion: a config starts from"),
])
def test_config_files_that_fail(body, fragment, place, tmp_path):
  # Prepare
  config = tmp_path / "my_config.py"
  config.write_text(body)
  # Execute
  result = _run("fuse", f"--config={config}", f"--store={place / 'store'}")
  # Assert
  _assert_one_error(result, fragment)
  # Execute: a folder given as the config file
  result = _run("fuse", f"--config={tmp_path}", f"--store={place / 'store'}")
  # Assert
  _assert_one_error(result, "is a folder")
  assert os.listdir(place) == []


def test_the_cold_fusion_command(place):
  # Prepare
  command = [sys.executable, "-m", "cold_fusion_tf"]
  # Execute
  listing = _run(command, "--help")
  # Assert
  assert listing.returncode == 0 and "programs:" in listing.stdout
  for program in STORE_PROGRAMS:
    assert f"  {program} " in listing.stdout
  # Execute / Assert: an unknown program, none, a program's help, a bad setting
  _assert_one_error(_run(command, "bogus"), "unknown program 'bogus'")
  assert _run(command).returncode == 2
  helped = _run(command, "fuse", "--help")
  assert helped.returncode == 0 and "--watch" in helped.stdout
  _assert_one_error(_run(command, "fuse", "--config.fusion.bogus=1",
                         f"--store={place / 'store'}"), "config.fusion has no field 'bogus'")
  assert os.listdir(place) == []


# --------------------------------------------------------------------------------------------
# Dataset folders (--config.task=<folder>): each bad file is one UserError naming file and line
# --------------------------------------------------------------------------------------------

GOOD = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]


def _jsonl(records) -> str:
  return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def _folder(root, train, info=None, ext="jsonl", others=None):
  """A dataset folder whose train split is ``train`` (text) and dev/test are good."""
  folder = root / "mydata"
  folder.mkdir(exist_ok=True)
  good = others if others is not None else (
      _jsonl(GOOD) if ext == "jsonl" else "text,label\ngood,1\nbad,0\n")
  (folder / f"train.{ext}").write_text(train, encoding="utf-8")
  for split in ("dev", "test"):
    (folder / f"{split}.{ext}").write_text(good, encoding="utf-8")
  if info is not None:
    (folder / "info.json").write_text(info if isinstance(info, str) else json.dumps(info))
  return str(folder)


NAMES = {"task": "classification", "label_names": ["neg", "pos"]}
DATASET_CASES = {
    "label_list": (dict(train=_jsonl(GOOD + [{"text": "x", "label": [1]}])),
                   r"train.jsonl:3: label \[1\] is not a class id, a label name or a number"),
    "label_superscript": (dict(train=_jsonl(GOOD + [{"text": "x", "label": "\u00b2"}])),
                          r"train.jsonl:3: label '\u00b2' is not a class id like the other"),
    "label_superscript_named": (
        dict(train=_jsonl(GOOD + [{"text": "x", "label": "\u00b2"}]), info=NAMES),
        r"train.jsonl:3: label '\u00b2' is not in the label set"),
    "regression_overflow": (
        dict(train=_jsonl(GOOD + ['{"text": "x", "label": 1' + "0" * 400 + "}"]),
             info={"task": "regression"}),
        r"train.jsonl:3: not valid JSON \(an integer of 401 characters"),
    "regression_huge_csv": (
        dict(train="text,label\na,0.5\nb,1" + "0" * 150 + "\n", ext="csv",
             info={"task": "regression"}, others="text,label\na,0.5\nb,1.5\n"),
        r"train.csv:3: label 1000.* is not a finite 32-bit number"),
    "label_5000_digits": (dict(train=_jsonl(GOOD + ['{"text": "x", "label": ' + "9" * 5000 + "}"])),
                          r"train.jsonl:3: not valid JSON \(an integer of 5000 characters"),
    "label_5000_digits_csv": (dict(train="text,label\na,1\nb," + "9" * 5000 + "\n", ext="csv"),
                              r"train.csv:3: label of 5000 characters"),
    "csv_field_too_long": (dict(train="text,label\n" + "x" * 140_000 + ",1\nb,0\n", ext="csv"),
                           r"train.csv:2: not valid CSV \(field larger than field limit"),
    "text_too_long": (dict(train=_jsonl(GOOD + [{"text": "x" * 100_001, "label": 1}])),
                      r"train.jsonl:3: field 'text' has 100001 characters; at most 100000"),
    "deep_info": (dict(train=_jsonl(GOOD), info="[" * 100_000 + "]" * 100_000),
                  r"info.json: JSON nested 100000 deep"),
    "deep_line": (dict(train=_jsonl(GOOD + ['{"text": "x", "label": ' + "[" * 50_000 + "]" * 50_000
                                            + "}"])),
                  r"train.jsonl:3: JSON nested 50001 deep"),
    "label_out_of_names": (dict(train=_jsonl(GOOD + [{"text": "x", "label": 2}]), info=NAMES),
                           r"train.jsonl:3: label 2 is outside the label set: expected 0..1"),
    "label_too_large": (dict(train=_jsonl(GOOD + [{"text": "x", "label": 1_000_000}])),
                        r"train.jsonl:3: label 1000000 is too large: class ids are 0..999"),
    "label_negative": (dict(train=_jsonl(GOOD + [{"text": "x", "label": -1}])),
                       r"train.jsonl:3: label -1 is negative"),
    "label_bool": (dict(train=_jsonl(GOOD + [{"text": "x", "label": True}])),
                   r"train.jsonl:3: label True is not a class id"),
    "label_nan": (dict(train=_jsonl(GOOD + ['{"text": "x", "label": NaN}'])),
                  r"train.jsonl:3: not valid JSON \(NaN is not a JSON number"),
    "text_surrogate": (dict(train=_jsonl(GOOD + ['{"text": "\\ud800", "label": 1}'])),
                       r"train.jsonl:3: field 'text' holds '\\ud800'"),
    "names_twice": (dict(train=_jsonl(GOOD), info={"label_names": ["a", "a"]}),
                    r"info.json: label_names lists \['a'\] more than once"),
    "names_not_strings": (dict(train=_jsonl(GOOD), info={"label_names": [0, 1]}),
                          r"info.json: label_names must be a list of label names"),
    "task_unknown": (dict(train=_jsonl(GOOD), info={"task": ["x"]}),
                     r"info.json: task \['x'\] is not supported"),
    "info_not_object": (dict(train=_jsonl(GOOD), info="[1, 2]"), r"info.json: expected a JSON object"),
    "csv_short_row": (dict(train="text,label\na,1\n\"multi\nline\"\n", ext="csv"),
                      r"train.csv:4: missing field 'label'"),
}


@pytest.mark.parametrize("case", sorted(DATASET_CASES))
def test_bad_dataset_files(case, tmp_path):
  # Prepare
  spec, message = DATASET_CASES[case]
  folder = _folder(tmp_path, **spec)
  # Execute / Assert
  with pytest.raises(UserError, match=message) as raised:
    data.load_task(folder)
  assert "\n" not in str(raised.value)


def test_dataset_files_that_are_not_files(tmp_path):
  # Prepare: dev.jsonl is a folder
  folder = _folder(tmp_path, _jsonl(GOOD))
  os.remove(os.path.join(folder, "dev.jsonl"))
  os.mkdir(os.path.join(folder, "dev.jsonl"))
  # Execute / Assert
  with pytest.raises(UserError, match=r"dev.jsonl: is a folder; it should be a file"):
    data.load_task(folder)
  # Prepare: dev.jsonl links to a device
  os.rmdir(os.path.join(folder, "dev.jsonl"))
  os.symlink("/dev/zero", os.path.join(folder, "dev.jsonl"))
  # Execute / Assert
  with pytest.raises(UserError, match=r"dev.jsonl: not a regular file"):
    data.load_task(folder)
  # Execute / Assert: a file given as the folder, bad caps
  with pytest.raises(UserError, match=r"is a file, not a folder"):
    data.load_task(os.path.join(folder, "train.jsonl"))
  with pytest.raises(UserError, match=r"max_examples.train=-1: a cap is a number"):
    data.load_task(folder, max_examples={"train": -1})
  with pytest.raises(UserError, match=r"max_examples.valid: no such split"):
    data.load_task(folder, max_examples={"valid": 3})


def test_csv_scores_are_a_regression_task_and_named_columns(tmp_path):
  # Prepare
  folder = _folder(tmp_path, "sentence,y\na,0.5\nb,4.25\n", ext="csv",
                   others="sentence,y\na,0.5\nb,1.5\n")
  # Execute
  task = data.load_task(folder, columns={"text": "sentence", "label": "y"})
  # Assert
  assert task.kind == "regression" and task.splits["train"].labels.tolist() == [0.5, 4.25]


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
  return tiny.make_store(str(tmp_path_factory.mktemp("bad_inputs") / "store"))


@pytest.mark.parametrize("case", ["label_list", "deep_info"])
def test_train_stops_on_a_bad_dataset_before_writing(case, tiny_store, tmp_path):
  # Prepare
  spec, message = DATASET_CASES[case]
  folder = _folder(tmp_path, **spec)
  before = _files(tiny_store)
  # Execute
  result = _run("train", f"--store={tiny_store}", f"--config.task={folder}",
                f"--workdir={tmp_path / 'work'}")
  # Assert
  line = _assert_one_error(result)
  assert __import__("re").search(message.replace("train.", "mydata/train."), line), line
  assert _files(tiny_store) == before and not os.path.exists(tmp_path / "work")


@pytest.mark.parametrize("damage,fragment", [
    ("truncated model", "model.safetensors: 100 bytes, not "),
    ("corrupt manifest", "manifest.json"),
    ("LATEST past the bases", "bases/000003/manifest.json: missing; base 3 is not complete"),
])
def test_init_refuses_a_damaged_store(tmp_path, damage, fragment):
  # Prepare: a store with base 0, then damaged.
  import synthetic  # pylint: disable=g-import-not-at-top
  store = synthetic.new_store(tmp_path)
  base0 = store.storage.local_path("bases/000000")
  if damage == "truncated model":
    os.truncate(os.path.join(base0, "model.safetensors"), 100)
  elif damage == "corrupt manifest":
    with open(os.path.join(base0, "manifest.json"), "w") as f:
      f.write("{not json")
  else:
    store.storage.write_bytes("LATEST", b"3\n")
  before = _files(tmp_path)
  # Execute
  result = _run("init", "--config=demo", f"--store={store.uri}")
  # Assert: one error line naming what is damaged; nothing written.
  _assert_one_error(result, fragment)
  assert _files(tmp_path) == before


# --------------------------------------------------------------------------------------------
# Paths that cannot be written or named: found before any model is loaded or trained
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("program,args,fragment", [
    ("init", ["--store=/proc/nope/store"], "--store=/proc/nope/store: cannot create files "
     "there (No such file or directory: /proc/nope); give a folder you may write to"),
    ("init", ["--store=/sys/kernel/store"], "--store=/sys/kernel/store: cannot create files "
     "there ("),
    ("export", ["--store={place}/store", "--out=/proc/nope/x"], "--out=/proc/nope/x: cannot "
     "create files there (No such file or directory: /proc/nope)"),
    ("evaluate", ["--base={place}/store", "--out=/proc/nope/r"], "--out=/proc/nope/r: cannot "
     "create files there (No such file or directory: /proc/nope)"),
])
def test_unwritable_folders_are_found_before_any_work(program, args, fragment, place):
  # Prepare
  args = [a.format(place=place) for a in args]
  # Execute
  result = _run(program, *args)
  # Assert: one error line, no model loaded, nothing written
  _assert_one_error(result, fragment)
  assert "creating store" not in result.stdout and os.listdir(place) == []


def test_train_finds_an_unwritable_workdir_before_training(tiny_store, tmp_path):
  # Prepare
  folder = _folder(tmp_path, _jsonl(GOOD * 4), others=_jsonl(GOOD * 2))
  before = _files(tiny_store)
  # Execute
  result = _run("train", f"--store={tiny_store}", f"--config.task={folder}",
                "--workdir=/proc/nope/wd", "--config.contributor_id=c2")
  # Assert: one error line before the first step; the store is unchanged
  _assert_one_error(result, "--workdir=/proc/nope/wd: cannot create files there (No such file "
                    "or directory: /proc/nope)")
  assert "step" not in result.stdout and _files(tiny_store) == before


@pytest.mark.parametrize("program,flag", [
    ("inspect", "store"), ("init", "store"), ("train", "workdir"), ("export", "out"),
    ("evaluate", "out"), ("evaluate", "base"), ("evaluate", "reference"),
    ("inspect", "results"),
])
def test_paths_that_are_not_utf8_are_refused(program, flag, place):
  # Prepare: a name with bytes that are not UTF-8 (Python keeps them as surrogates)
  value = os.fsdecode(os.fsencode(str(place)) + b"/\xff\xfe")
  # Execute
  result = _run(program, f"--{flag}={value}")
  # Assert
  _assert_one_error(result, f"--{flag}={place}/\\xff\\xfe: not valid UTF-8; give a path")
  assert os.listdir(place) == []


def test_evaluate_says_what_is_wrong_with_the_base(place):
  # Prepare: a folder standing for a store
  (place / "store").mkdir()
  # Execute
  result = _run("evaluate", f"--base={place}/store@-1", f"--out={place}/out")
  # Assert: not "--reference is required"
  _assert_one_error(result, f"--base={place}/store@-1: '-1' is not a base number; STORE@N "
                    "takes N, a whole number from 0 to 999999")
  assert os.listdir(place) == ["store"]


@pytest.mark.parametrize("kind", ["link to a local secret", "fifo"])
def test_export_refuses_a_base_file_that_is_no_regular_file(tmp_path, kind):
  # Prepare: a store whose manifest lists, with the right size and sha256, a link to a local
  # secret (it was copied into the export) or a FIFO (the export hung on it)
  import hashlib  # pylint: disable=g-import-not-at-top
  import synthetic  # pylint: disable=g-import-not-at-top
  store = synthetic.new_store(tmp_path)
  folder = store.storage.local_path("bases/000000")
  secret = tmp_path / "secret.txt"
  secret.write_text("TOP SECRET\n")
  if kind == "fifo":
    os.mkfifo(os.path.join(folder, "notes.txt"))
    listed = {"sha256": hashlib.sha256(b"").hexdigest(), "size": 0}
  else:
    os.symlink(secret, os.path.join(folder, "notes.txt"))
    listed = {"sha256": hashlib.sha256(secret.read_bytes()).hexdigest(), "size": 11}
  manifest = store.manifest(0)
  manifest["files"]["notes.txt"] = listed
  store.storage.write_bytes("bases/000000/manifest.json", json.dumps(manifest).encode())
  # Execute
  result = _run("export", f"--store={store.uri}", f"--out={tmp_path / 'out'}", timeout=60)
  # Assert: one error line naming the file; no export
  what = "a FIFO" if kind == "fifo" else "a symbolic link"
  _assert_one_error(result, f"{folder}/notes.txt: is {what}, not a regular file. The base is "
                    "damaged or tampered with")
  assert not os.path.exists(tmp_path / "out")
