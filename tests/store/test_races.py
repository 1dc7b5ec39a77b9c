"""Races and identity in the store: one body per contributor id, idempotent retries, OS locks
on LATEST that a killed process cannot leave behind, a waiting fuser that counts only what it
published, and size limits checked before a GCS download."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

import synthetic as h
from cold_fusion_tf import fusion
from cold_fusion_tf import store as store_lib
from cold_fusion_tf.errors import UserError
from cold_fusion_tf.store import layout
from cold_fusion_tf.store import rollbacks
from cold_fusion_tf.tensors import safetensors_io as weights

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _meta(store) -> dict:
  return {"base_sha256": store.base_sha256(0), "dataset": "sst2", "num_examples": 10,
          "steps": 1, "dev_metrics": {"score": 0.5}}


def _body(tmp_path, name, seed) -> str:
  path = str(tmp_path / f"{name}.safetensors")
  weights.save_safetensors({"w": np.random.default_rng(seed).normal(size=8).astype(np.float32)},
                           path)
  return path


def _gcs_store(gcs_emulator, tmp_path) -> store_lib.Store:
  """A synthetic store created on GCS (base 0 from the helpers' model)."""
  bucket = gcs_emulator.make_bucket()
  local = h.new_store(tmp_path, name="seed")
  store = store_lib.Store(f"gs://{bucket}/run", cache_dir=str(tmp_path / "gcs-cache"))
  store.create(local.base_dir(0), {"source_model": "synthetic"})
  return store


@pytest.fixture(params=["local", "gcs"])
def any_store(request, tmp_path):
  if request.param == "local":
    return h.new_store(tmp_path)
  return _gcs_store(request.getfixturevalue("gcs_emulator"), tmp_path)


# ----------------------------------------------------------------------------------------------
# One body per contributor id.


def test_two_processes_with_one_id_store_exactly_one_consistent_contribution(any_store,
                                                                             tmp_path):
  # Prepare: a preempted contributor restarted while the old process still runs; each has
  # a body of its own.
  store = any_store
  bodies = [_body(tmp_path, f"b{i}", i) for i in range(2)]
  barrier = threading.Barrier(2)
  results = [None, None]

  def contribute(i):
    mine = store_lib.Store(store.uri, cache_dir=store.cache_dir)
    barrier.wait(timeout=30)
    try:
      results[i] = mine.put_contribution(0, "alice", bodies[i], _meta(store))
      mine.check_own_contribution(0, "alice", results[i])
    except UserError as e:
      results[i] = e

  # Execute
  threads = [threading.Thread(target=contribute, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(120)
  # Assert: one stands, the other was refused; what is stored is consistent.
  won = [r for r in results if isinstance(r, dict)]
  lost = [r for r in results if isinstance(r, UserError)]
  assert len(won) == 1 and len(lost) == 1, results
  assert "already contributed another body" in str(lost[0])
  assert store.stored_body_sha256(0, "alice") == won[0]["body_sha256"]
  assert store.contribution_meta(0, "alice") == won[0]


def test_a_retry_of_the_same_body_succeeds_and_another_body_is_refused(any_store, tmp_path):
  # Prepare
  store = any_store
  body = _body(tmp_path, "b", 1)
  first = store.put_contribution(0, "alice", body, _meta(store))
  # Execute
  again = store_lib.Store(store.uri, cache_dir=store.cache_dir).put_contribution(
      0, "alice", body, _meta(store))
  # Assert
  assert again == first
  with pytest.raises(UserError, match="already contributed another body"):
    store.put_contribution(0, "alice", _body(tmp_path, "other", 2), _meta(store))
  assert store.stored_body_sha256(0, "alice") == first["body_sha256"]


def test_a_body_left_by_an_interrupted_upload_is_never_replaced(tmp_path):
  # Prepare: an earlier attempt uploaded its body and died before contribution.json.
  store = h.new_store(tmp_path)
  earlier = _body(tmp_path, "earlier", 1)
  store.storage.upload(earlier, "contributions/000000/alice/body.safetensors")
  # Execute / Assert: a different body under that id is refused, the same one completes.
  with pytest.raises(UserError, match="already contributed another body"):
    store.put_contribution(0, "alice", _body(tmp_path, "later", 2), _meta(store))
  assert not store.has_contribution(0, "alice")
  meta = store.put_contribution(0, "alice", earlier, _meta(store))
  store.check_own_contribution(0, "alice", meta)


def test_read_back_finds_a_body_that_does_not_match(tmp_path):
  # Prepare
  store = h.new_store(tmp_path)
  meta = store.put_contribution(0, "alice", _body(tmp_path, "b", 1), _meta(store))
  path = h.body_path(store, "alice")
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:-4] + b"\0\0\0\0")
  # Execute / Assert
  with pytest.raises(UserError, match="stored body does not match its sha256; keep the"):
    store.check_own_contribution(0, "alice", meta)


def test_the_storage_tells_size_and_creation_order(any_store):
  # Prepare
  storage = any_store.storage
  storage.write_bytes("probe/first", b"12345")
  first = storage.stat("probe/first")
  while True:  # until the storage's clock has moved on
    storage.write_bytes("probe/second", b"1")
    second = storage.stat("probe/second")
    if second.created_ns > first.created_ns:
      break
    storage.delete_prefix("probe/second")
  # Execute
  again = storage.stat("probe/first")
  # Assert: what the storage says, not what a writer claims.
  assert (first.size, second.size) == (5, 1) and again == first
  assert storage.stat("probe/missing") is None


# ----------------------------------------------------------------------------------------------
# LATEST: OS locks and real races only.


def test_a_lock_file_left_by_a_killed_fuser_does_not_stop_publishing(tmp_path):
  # Prepare: the lock files an older or killed fuser leaves behind, and a process that holds
  # the OS lock and is killed while holding it.
  store = h.new_store(tmp_path)
  h.contribute(store, "a", h.nudged(h.base_tensors(store), 1))
  root = store.storage.local_path("")
  open(os.path.join(root, "LATEST.lock"), "w").close()
  holder = subprocess.Popen(
      [sys.executable, "-c", "import fcntl, os, sys, time\n"
       "fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR)\n"
       "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(600)",
       os.path.join(root, ".LATEST.lock")], stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "locked"
  holder.send_signal(signal.SIGKILL)
  holder.wait(30)
  logged = []
  # Execute
  outcome = fusion.fuse(store, log=logged.append, settings=fusion.Settings(workers=1))
  # Assert
  assert outcome.published == 1 and not outcome.lost_race and store.latest() == 1
  assert not any("another fuser" in m for m in logged)


def test_the_watching_fuser_does_not_count_a_lost_race_as_published(tmp_path):
  # Prepare: base 1 is published; while the watching fuser publishes base 2, the owner rolls
  # LATEST back to base 0 (LATEST really moves).
  store = h.new_store(tmp_path)
  base = h.base_tensors(store)
  for i in range(2):
    h.contribute(store, f"c{i}", h.nudged(base, i))
  fusion.fuse(store, log=lambda m: None, settings=fusion.Settings(workers=1))
  h.contribute(store, "late", h.nudged(h.base_tensors(store), 5))
  owner = store_lib.Store(store.uri, cache_dir=store.cache_dir)
  swap = store.storage.compare_and_swap
  moved = []

  def rollback_first(name, data, token):
    if name == layout.LATEST_FILE and not moved:
      moved.append(rollbacks.rollback(owner, 0, "withdrawn during the test", by="test"))
    return swap(name, data, token)

  store.storage.compare_and_swap = rollback_first
  logged = []
  settings = fusion.Settings(workers=1, watch_iterations=1, poll_seconds=0.01)
  # Execute
  status = fusion.run(store, settings, watch=True, log=logged.append)
  # Assert: the lost race was not counted; the watcher fused again from base 0, into base 2
  # (after the withdrawn base 1).
  assert status == 0 and moved
  assert any("LATEST moved to base 0 while publishing base 2" in m for m in logged), logged
  latest = store.latest()
  assert latest == 2 and store.manifest(2)["parent"]["iteration"] == 0
  assert sorted(e["id"] for e in store.manifest(2)["fusion"]["contributions"]) == ["c0", "c1"]


# ----------------------------------------------------------------------------------------------
# GCS: sizes are checked against the object's metadata before any download.


def test_gcs_objects_over_their_limit_are_refused_before_download(gcs_emulator, tmp_path,
                                                                 monkeypatch):
  # Prepare: a 5 MiB contribution.json and a body far larger than the base's layout allows.
  store = _gcs_store(gcs_emulator, tmp_path)
  h.contribute(store, "honest", h.nudged(h.base_tensors(store), 1))
  big = tmp_path / "big"
  with open(big, "wb") as f:
    f.truncate(5 << 20)
  store.storage.upload(str(big), "contributions/000000/huge-json/contribution.json")
  with open(big, "wb") as f:
    f.truncate(64 << 20)
  meta = dict(_meta(store), body_sha256="0" * 64)
  store.storage.upload(str(big), "contributions/000000/huge-body/body.safetensors")
  store.storage.write_bytes("contributions/000000/huge-body/contribution.json",
                            layout.json_bytes({"format_version": 1, "base_iteration": 0,
                                               "contributor_id": "huge-body", **meta}))
  from google.cloud.storage import blob as blob_lib  # pylint: disable=g-import-not-at-top
  downloaded = []
  real = blob_lib.Blob.download_to_filename

  def recording(self, *args, **kwargs):
    downloaded.append(self.name)
    return real(self, *args, **kwargs)

  monkeypatch.setattr(blob_lib.Blob, "download_to_filename", recording)
  # Execute
  outcome = fusion.fuse(store, log=lambda m: None, settings=fusion.Settings(workers=1))
  # Assert
  assert [e["id"] for e in outcome.fused] == ["honest"]
  reasons = {r["id"]: r["reason"] for r in outcome.rejected}
  assert "5242880 bytes, more than the 16384 allowed" in reasons["huge-json"]
  assert "67108864 bytes, more than the" in reasons["huge-body"]
  assert not any("huge" in name for name in downloaded)


def test_a_contributor_keeps_its_checkpoints_when_its_id_holds_another_body(tmp_path):
  # Prepare: another process of the same contributor has uploaded a different body (and not
  # yet its contribution.json).
  import tiny  # pylint: disable=g-import-not-at-top
  path = tiny.make_store(str(tmp_path / "store"))
  store = store_lib.Store(path)
  store.storage.upload(_body(tmp_path, "other", 3),
                       "contributions/000000/trec_coarse/body.safetensors")
  config = tiny.write_config(str(tmp_path / "config.py"), train=32,
                             checkpoint_every_steps=1, steps_per_execution=1)
  workdir = str(tmp_path / "workdir")
  # Execute
  result = subprocess.run(tiny.train_command(config, path, workdir),
                          env=tiny.env(), capture_output=True, text=True, timeout=300,
                          check=False)
  # Assert: refused with one message; the checkpoints that can make the body again are kept.
  assert result.returncode == 2, result.stderr[-3000:]
  assert "already contributed another body" in result.stderr.strip().splitlines()[-1]
  assert os.listdir(os.path.join(workdir, "checkpoints"))
  assert not store.has_contribution(0, "trec_coarse")
