"""One contributor in process (a tiny real BERT on a slice of a demo dataset): what it uploads
when the store's LATEST moves while it trains, and what it keeps when it stops before its
upload."""

from __future__ import annotations

import json
import os

import pytest

from cold_fusion_tf import store as store_lib
from cold_fusion_tf.training import contributor
from cold_fusion_tf.errors import UserError
import tiny


def test_a_base_published_while_training_is_named_and_the_upload_keeps_its_own_base(tmp_path):
  # Prepare: LATEST moves on to base 1 while the contributor trains from base 0
  path = tiny.make_store(str(tmp_path / "store"))
  store = store_lib.Store(path)
  base0_sha = store.base_sha256(0)
  config = tiny.demo_config(tiny.MINILM)
  config.recipe.probe_epochs = 0.0
  upload = store.put_contribution

  def upload_then_publish(*args, **kwargs):
    meta = upload(*args, **kwargs)
    store.latest = lambda: 1  # what a fuser publishing base 1 meanwhile makes LATEST say
    return meta

  store.put_contribution = upload_then_publish
  lines = []
  # Execute
  meta = contributor.contribute(store, config, "sst2", "alice", log=lines.append,
                                workdir=str(tmp_path / "work"))
  # Assert: filed under the base it trained from, which its contribution.json names
  with open(os.path.join(path, "contributions", "000000", "alice", "contribution.json"),
            encoding="utf-8") as f:
    stored = json.load(f)
  assert stored == meta
  assert stored["base_iteration"] == 0 and stored["base_sha256"] == base0_sha
  assert not os.path.exists(os.path.join(path, "contributions", "000001"))
  # ... and the contributor is told that the next fusion will not use it
  notes = [str(line) for line in lines if "note: LATEST" in str(line)]
  assert notes == ["[alice] note: LATEST is now base 1, not base 0 this contribution was "
                   "trained from and is filed under; the next fusion of base 1 does not use "
                   "it: run again to contribute to base 1."]


def test_a_keras_hub_run_stopped_before_its_upload_keeps_its_training_state(tmp_path):
  # Prepare: the keras-hub body; the process stops after training, before anything is uploaded
  path = tiny.make_store(str(tmp_path / "store"))
  store = store_lib.Store(path)
  config = tiny.demo_config(tiny.MINILM)
  config.model.body = "keras_hub"
  config.recipe.probe_epochs = 0.0

  def stopped(*args, **kwargs):
    raise KeyboardInterrupt  # Ctrl-C, or the upload cut off

  store.put_contribution = stopped
  workdir = tmp_path / "work"
  # Execute
  with pytest.raises(KeyboardInterrupt):
    contributor.contribute(store, config, "sst2", "bob", log=lambda line: None,
                           workdir=str(workdir))
  # Assert: the backup and the early-stopping state stay for the rerun to resume from (the
  # contributor deletes them only once its upload is read back), nothing is in the store
  kept = workdir / "checkpoints" / "keras_hub"
  assert os.listdir(kept / "backup")
  assert (kept / "early_stopping.json").is_file() and (kept / "best_weights.npz").is_file()
  assert not os.path.exists(os.path.join(path, "contributions", "000000", "bob"))


def test_a_remote_dataset_folder_is_copied_checked_and_kept_in_step(tmp_path):
  # Prepare: a folder as tf.io.gfile lists it (a local path here, gs:// for users) with the
  # three splits, info.json and files that are no part of a dataset.
  remote = tmp_path / "remote" / "mytask"
  remote.mkdir(parents=True)
  line = json.dumps({"text": "a fine film", "label": 1}) + "\n"
  for split in ("train", "dev", "test"):
    (remote / f"{split}.jsonl").write_text(line * 4)
  (remote / "info.json").write_text("{}")
  (remote / "train.jsonl.gz").write_bytes(b"\x1f\x8b")
  (remote / "notes.txt").write_text("not data")
  # Execute
  local = contributor._fetch_folder(str(remote), 1 << 20)  # pylint: disable=protected-access
  first = sorted(os.listdir(local))
  (remote / "info.json").unlink()
  again = sorted(os.listdir(contributor._fetch_folder(str(remote), 1 << 20)))  # pylint: disable=protected-access
  with pytest.raises(UserError) as raised:
    contributor._fetch_folder(str(remote), 10)  # pylint: disable=protected-access
  # Assert
  assert first == ["dev.jsonl", "info.json", "test.jsonl", "train.jsonl"]
  assert again == ["dev.jsonl", "test.jsonl", "train.jsonl"]  # deleted there, gone here
  assert "dev.jsonl: 144 bytes, more than the 10 a dataset file may have " \
         "(config.data.max_file_mb)" in str(raised.value)
