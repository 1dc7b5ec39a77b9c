"""The absl programs: bad input ends with one clear `error:` line, exit status 2, and nothing
written; an interrupted contributor leaves nothing a reader would take as complete."""

import fcntl
import json
import os
import signal
import subprocess
import sys

import pytest

from cold_fusion_tf import store as store_lib
import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(program, *args, env=None):
  full_env = dict(os.environ, HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
  return subprocess.run([sys.executable, "-m", f"cold_fusion_tf.{program}",
                         "--config=configs/demo.py", *args],
                        cwd=REPO, env=full_env, capture_output=True, text=True, timeout=300)


def _assert_clean_error(result, *fragments):
  assert result.returncode == 2, result.stderr[-2000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  for fragment in fragments:
    assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
  root = tmp_path_factory.mktemp("programs")
  source = tiny.write_tiny_base(str(root / "source"), "bert")
  store = store_lib.Store(str(root / "store"))
  store.create(source, {"source_model": source})
  return str(root / "store"), str(root)


SMALL = ["--config.recipe.batch_size=8", "--config.recipe.max_steps=2",
         "--config.data.max_examples.train=32", "--config.data.max_examples.dev=8",
         "--config.data.max_examples.test=8", f"--config.data.dirs=('{tiny.DATA}',)"]


def test_train_then_fuse_publish_the_next_base(tiny_store, tmp_path):
  # Prepare
  store, _ = tiny_store
  # Execute
  result = _run("train", f"--store={store}", "--config.task=sst2",
                "--config.contributor_id=alice-sst2", *SMALL)
  # Assert
  assert result.returncode == 0, result.stderr[-3000:]
  assert "contributed to iteration 0" in result.stdout
  meta = json.load(open(os.path.join(store, "contributions", "000000", "alice-sst2",
                                     "contribution.json")))
  assert meta["dataset"] == "sst2" and meta["contributor_id"] == "alice-sst2"
  # Execute
  # The same id again is refused before any training.
  again = _run("train", f"--store={store}", "--config.task=sst2",
               "--config.contributor_id=alice-sst2", *SMALL)
  # Assert
  _assert_clean_error(again, "already contributed to iteration 0")
  assert "training" not in again.stdout
  # Prepare
  # A contributor that died after uploading its body (no contribution.json) is invisible.
  half = os.path.join(store, "contributions", "000000", "bob")
  os.makedirs(half)
  open(os.path.join(half, "body.safetensors"), "wb").write(b"partial")
  # Execute
  fused = _run("fuse", f"--store={store}")
  # Assert
  assert fused.returncode == 0, fused.stderr[-3000:]
  assert "published base 1: mean of 1 contribution(s) (alice-sst2)" in fused.stdout
  manifest = json.load(open(os.path.join(store, "bases", "000001", "manifest.json")))
  assert [c["id"] for c in manifest["fusion"]["contributions"]] == ["alice-sst2"]
  assert manifest["fusion"]["rejected"] == []
  assert open(os.path.join(store, "LATEST")).read().strip() == "1"


@pytest.mark.parametrize("files,fragment", [
    ({"train.jsonl": '{"text": "a", "label": 0}\n{"text": "b", "label": 5}\n'},
     "train.jsonl:2: label 5 is outside the label set"),
    ({"train.jsonl": '{"text": "a", "label": 0}\n{"label": 1}\n'},
     "train.jsonl:2: missing field 'text'"),
])
def test_train_with_bad_data_stops_before_training(tiny_store, tmp_path, files, fragment):
  # Prepare
  store, _ = tiny_store
  folder = tmp_path / "mydata"
  folder.mkdir()
  good = '{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n'
  for split in ("train", "dev", "test"):
    (folder / f"{split}.jsonl").write_text(files.get(f"{split}.jsonl", good))
  (folder / "info.json").write_text('{"task": "classification", "label_names": ["n", "p"]}')
  before = sorted(os.listdir(os.path.join(store, "contributions", "000000"))) if os.path.isdir(
      os.path.join(store, "contributions", "000000")) else []
  # Execute
  result = _run("train", f"--store={store}", f"--config.task={folder}", *SMALL)
  # Assert
  _assert_clean_error(result, fragment)
  after = sorted(os.listdir(os.path.join(store, "contributions", "000000"))) if os.path.isdir(
      os.path.join(store, "contributions", "000000")) else []
  assert before == after


def test_unsafe_contributor_id_and_unknown_dataset(tiny_store):
  # Prepare
  store, _ = tiny_store
  # Execute / Assert
  _assert_clean_error(_run("train", f"--store={store}", "--config.task=sst2",
                           "--config.contributor_id=../../etc", *SMALL),
                      "Contributor id '../../etc' is not a safe name")
  _assert_clean_error(_run("train", f"--store={store}", "--config.task=no_such_task", *SMALL),
                      "Unknown dataset 'no_such_task'", "Known datasets:")



def test_a_second_trainer_in_the_same_workdir_stops_at_once(tiny_store, tmp_path):
  # Prepare: a running contributor holds its workdir (what the train program takes: flock)
  store, _ = tiny_store
  workdir = tmp_path / "work"
  workdir.mkdir()
  with open(workdir / ".lock", "w", encoding="utf-8") as held:
    fcntl.flock(held, fcntl.LOCK_EX)
    # Execute: the same contributor again, e.g. a restarted job while the old one still runs
    result = _run("train", f"--store={store}", "--config.task=sst2",
                  "--config.contributor_id=twice", f"--workdir={workdir}", *SMALL)
  # Assert: stopped before training, nothing written to its checkpoints or to the store
  _assert_clean_error(result, f"--workdir={workdir}: another process is training in it")
  assert sorted(os.listdir(workdir)) == [".lock"]
  assert not os.path.exists(os.path.join(store, "contributions", "000000", "twice"))


def test_sigterm_ends_a_trainer_with_one_line_and_nothing_uploaded(tiny_store, tmp_path):
  # Prepare: a contributor with far more steps than it gets to run
  store, _ = tiny_store
  args = [a for a in SMALL if "max_steps" not in a]
  proc = subprocess.Popen(
      [sys.executable, "-m", "cold_fusion_tf.train", "--config=configs/demo.py",
       f"--store={store}", "--config.task=sst2", "--config.contributor_id=stopped",
       f"--workdir={tmp_path / 'work'}", "--config.recipe.max_steps=100000",
       "--config.recipe.epochs=1000", *args],
      cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="3"),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    for line in proc.stdout:  # training has begun once it says how long it is
      if "steps" in line:
        break
    # Execute: what a preempted VM or a stopped job sends
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  # Assert: one line, the conventional status, and no contribution
  assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
  assert "Traceback" not in stderr
  assert stderr.strip().splitlines()[-1].startswith("terminated (SIGTERM); what was saved")
  assert not os.path.exists(os.path.join(store, "contributions", "000000", "stopped"))


def test_a_directory_that_is_not_a_store(tmp_path):
  # Prepare
  (tmp_path / "notes.txt").write_text("hello")
  # Execute / Assert
  _assert_clean_error(_run("fuse", f"--store={tmp_path}"), "is not a ColD Fusion store")
  _assert_clean_error(_run("run", f"--store={tmp_path}", *SMALL),
                      "is not empty and not a ColD Fusion store")
  assert os.listdir(tmp_path) == ["notes.txt"]


def test_unknown_model_type_is_refused(tmp_path):
  # Prepare
  source = tmp_path / "gpt"
  source.mkdir()
  (source / "config.json").write_text('{"model_type": "gpt2", "n_layer": 2}')
  # Execute
  result = _run("run", f"--store={tmp_path / 'store'}", f"--config.model.source={source}",
                *SMALL)
  # Assert
  _assert_clean_error(result, "model_type 'gpt2' is not supported", "bert, roberta")
  assert not os.path.exists(tmp_path / "store" / "LATEST")
