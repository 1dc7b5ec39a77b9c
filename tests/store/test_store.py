"""The store protocol, once per backend (a local directory and GCS on fake-gcs-server).

Every parametrized test makes the same assertions for both backends through the
``store_uri`` fixture; the GCS-only tests at the end cover what only a remote store has: the
local base cache (a base is not fetched twice), a racer that must not overwrite a base that
is already published, and the server dying in the middle of a publish.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid

import numpy as np
import pytest
import safetensors.numpy

from cold_fusion_tf import store as store_lib
from cold_fusion_tf.errors import UserError

_SHAPES = {"embeddings.word_embeddings.weight": (50, 8), "encoder.layer.0.dense.weight": (8, 8),
           "encoder.layer.0.dense.bias": (8,)}


def _sha256(path) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _tensors(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in _SHAPES.items()}


def write_base(directory, seed: int = 0) -> str:
  """A small base directory (config, safetensors weights, a vocabulary); no TensorFlow."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
    json.dump({"model_type": "bert", "hidden_size": 8, "vocab_size": 50}, f)
  safetensors.numpy.save_file(_tensors(seed), os.path.join(directory, store_lib.MODEL))
  with open(os.path.join(directory, "vocab.txt"), "w", encoding="utf-8") as f:
    f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(46)]) + "\n")
  return str(directory)


def write_body(path, seed: int) -> str:
  safetensors.numpy.save_file(_tensors(seed), str(path))
  return str(path)


def _meta(store, dataset="sst2"):
  return {"base_sha256": store.base_sha256(0), "dataset": dataset, "num_examples": 40,
          "steps": 5, "dev_metrics": {"score": 0.5}}


@pytest.fixture(params=["local", "gcs"])
def store_uri(request, tmp_path, monkeypatch):
  """A URI of a fresh, empty store location: a local directory or gs://<bucket>/<prefix>."""
  monkeypatch.setenv("COLD_FUSION_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("COLD_FUSION_GCS_RETRY_DEADLINE", "10")
  if request.param == "local":
    return str(tmp_path / "store")
  bucket = request.getfixturevalue("gcs_test_bucket")
  return f"gs://{bucket}/s-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def created(store_uri, tmp_path):
  """(store, source base directory) for a store holding base 0."""
  source = write_base(tmp_path / "base0", seed=0)
  store = store_lib.Store(store_uri)
  assert store.create(source, {"source_model": "tiny"}) is True
  return store, source


# --- both backends ------------------------------------------------------------------


def test_create_publishes_base_zero(created):
  # Prepare
  store, source = created
  # Assert
  assert store.run_info()["model_type"] == "bert"
  assert store.run_info()["source_model"] == "tiny"
  assert store.latest() == 0 and store.require_latest() == 0
  manifest = store.manifest(0)
  assert sorted(manifest["files"]) == ["config.json", "model.safetensors", "vocab.txt"]
  assert manifest["parent"] is None
  local = store.base_dir(0)
  for name, info in manifest["files"].items():
    assert info["sha256"] == _sha256(os.path.join(source, name))
    assert _sha256(os.path.join(local, name)) == info["sha256"]
  # (A local store is read in place, manifest included; a remote one through the cache.)
  assert set(os.listdir(local)) - {"manifest.json"} == set(manifest["files"])
  assert store.base_sha256(0) == _sha256(os.path.join(source, store_lib.MODEL))
  # Execute / Assert
  # A second create (another process, a rerun) changes nothing.
  again = store_lib.Store(store.uri)
  assert again.create(source, {"source_model": "other"}) is False
  assert again.run_info()["source_model"] == "tiny"
  assert again.storage.read_bytes("LATEST") == b"0\n"


def test_not_a_store(store_uri, tmp_path):
  # Prepare
  store = store_lib.Store(store_uri)
  # Execute / Assert: an empty location is not a store
  assert not store.exists() and store.latest() is None
  for call in (store.run_info, store.require_latest):
    with pytest.raises(UserError, match="is not a ColD Fusion store"):
      call()
  # Prepare: a file that is not a store's
  store.storage.write_bytes("notes.txt", b"something else lives here")
  # Execute / Assert
  with pytest.raises(UserError, match="not empty and not a ColD Fusion store"):
    store.create(write_base(tmp_path / "b"), {})
  assert not store.storage.exists("run.json") and not store.storage.exists("bases")


def test_a_store_path_that_is_not_utf8_is_a_user_error(tmp_path):
  # Prepare: a folder name with bytes that are not UTF-8, as Python gets it from argv
  uri = os.fsdecode(os.fsencode(str(tmp_path)) + b"/\xff\xfe")
  # Execute / Assert
  with pytest.raises(UserError, match=r"/\\xff\\xfe: the store's path is not valid UTF-8"):
    store_lib.Store(uri)
  assert os.listdir(tmp_path) == []


def test_check_writable_finds_a_store_folder_that_cannot_be_made(tmp_path):
  # Prepare
  (tmp_path / "file").write_text("a regular file\n")
  # Execute / Assert: no such parent, a parent that is a file
  with pytest.raises(UserError, match=r"^--store=/proc/nope/store: cannot create files there "
                     r"\(No such file or directory: /proc/nope\)"):
    store_lib.Store("/proc/nope/store").check_writable()
  with pytest.raises(UserError, match="Not a directory"):
    store_lib.Store(str(tmp_path / "file" / "store")).check_writable()
  # Execute / Assert: a new store's folder can be made, and is not left behind
  store_lib.Store(str(tmp_path / "new" / "store")).check_writable()
  assert os.listdir(tmp_path) == ["file"]


def test_corrupt_or_missing_base_file_is_named(created, tmp_path):
  # Prepare: one byte of the published model changed
  store, _ = created
  name = "bases/000000/model.safetensors"
  original = store.storage.read_bytes(name)
  data = bytearray(original)
  data[-1] ^= 0xFF  # Same size, one bit pattern changed: only the sha256 can tell.
  store.storage.write_bytes(name, bytes(data))
  fresh = store_lib.Store(store.uri, cache_dir=str(tmp_path / "fresh-cache"))
  # Execute / Assert
  with pytest.raises(UserError, match=r"bases/000000/model\.safetensors: size or sha256"):
    fresh.base_dir(0)
  # Prepare: the model restored, the vocabulary deleted
  store.storage.write_bytes(name, original)
  store.storage.delete_prefix("bases/000000/vocab.txt")
  # Execute / Assert
  with pytest.raises(UserError, match=r"000000/vocab\.txt: listed in the manifest but missing"):
    store_lib.Store(store.uri, cache_dir=str(tmp_path / "cache-2")).base_dir(0)


def _relist(store, name: str, sha256: str, size: int) -> None:
  """Rewrites base 0's manifest so that it lists ``name`` with ``sha256`` and ``size`` (what
  anyone who can write the store can do)."""
  manifest = store.manifest(0)
  manifest["files"][name] = {"sha256": sha256, "size": size}
  store.storage.write_bytes("bases/000000/manifest.json", json.dumps(manifest).encode())


@pytest.mark.parametrize("kind", ["link out of the store", "fifo", "link to a device"])
def test_a_base_file_that_is_no_regular_file_is_refused_at_once(tmp_path, kind):
  # Prepare: a local store whose manifest lists, with the right size and sha256, a link to a
  # local secret (export would copy it), a FIFO or /dev/zero (hashing them never ended)
  store = store_lib.Store(str(tmp_path / "store"), cache_dir=str(tmp_path / "cache"))
  store.create(write_base(tmp_path / "base0"), {"source_model": "tiny"})
  folder = store.storage.local_path("bases/000000")
  secret = tmp_path / "secret.txt"
  secret.write_text("TOP SECRET\n")
  empty = hashlib.sha256(b"").hexdigest()
  if kind == "link out of the store":
    os.symlink(secret, os.path.join(folder, "notes.txt"))
    _relist(store, "notes.txt", _sha256(secret), secret.stat().st_size)
  elif kind == "fifo":
    os.mkfifo(os.path.join(folder, "notes.txt"))
    _relist(store, "notes.txt", empty, 0)
  else:
    os.symlink("/dev/zero", os.path.join(folder, "notes.txt"))
    _relist(store, "notes.txt", empty, 0)
  out = tmp_path / "copy"
  out.mkdir()
  # Execute / Assert: refused (not read, not hung on), by base_dir and by copy_base
  what = "a FIFO" if kind == "fifo" else "a symbolic link"
  for read in (lambda: store.base_dir(0), lambda: store.copy_base(0, str(out))):
    with pytest.raises(UserError, match=rf"000000/notes\.txt: is {what}, not a regular file\. "
                       r"The base is damaged or tampered with: restore the file, or withdraw"):
      read()
  assert os.listdir(out) == []


def test_copy_base_copies_what_the_manifest_names_and_nothing_else(tmp_path):
  # Prepare: a store whose vocabulary is then rewritten in place (same size)
  store = store_lib.Store(str(tmp_path / "store"), cache_dir=str(tmp_path / "cache"))
  store.create(write_base(tmp_path / "base0"), {"source_model": "tiny"})
  vocab = os.path.join(store.storage.local_path("bases/000000"), "vocab.txt")
  intact, out, skipped = (tmp_path / name for name in ("intact", "copy", "skipped"))
  for folder in (intact, out, skipped):
    folder.mkdir()
  # Execute
  store.copy_base(0, str(intact))
  store.copy_base(0, str(skipped), skip=("model.safetensors",))
  with open(vocab, "r+b") as f:
    f.write(b"[EVIL]")
  # Assert: the clean copies hold every file asked for, bitwise; the tampered one is refused
  assert sorted(os.listdir(intact)) == ["config.json", "model.safetensors", "vocab.txt"]
  assert sorted(os.listdir(skipped)) == ["config.json", "vocab.txt"]
  assert _sha256(intact / "vocab.txt") == store.manifest(0)["files"]["vocab.txt"]["sha256"]
  with pytest.raises(UserError, match=r"000000/vocab\.txt: size or sha256 does not match the "
                     "manifest"):
    store.copy_base(0, str(out))


def test_bad_latest_and_manifest_are_user_errors(created):
  # Prepare: a manifest without its file list
  store, _ = created
  store.storage.write_bytes("bases/000000/manifest.json", b'{"format_version": 1, "iteration": 0}')
  # Execute / Assert
  with pytest.raises(UserError, match="files"):
    store.manifest(0)
  # Prepare: a LATEST that is not a number
  store.storage.write_bytes("LATEST", b"../../etc\n")
  # Execute / Assert
  with pytest.raises(UserError, match="is not an iteration number"):
    store.latest()


def test_publish_next_base_and_lost_race(created, tmp_path):
  # Prepare
  store, _ = created
  fields = {"parent": {"iteration": 0, "sha256": store.base_sha256(0)}}
  # Execute
  manifest = store.publish_base(1, write_base(tmp_path / "b1", seed=1), fields)
  # Assert
  assert store.latest() == 1
  assert store.manifest(1) == manifest
  assert manifest["parent"]["iteration"] == 0
  winner = manifest["files"][store_lib.MODEL]["sha256"]
  # Execute / Assert
  # A second fuser for the same iteration (it read LATEST = 0 earlier) loses ...
  with pytest.raises(store_lib.LostRace):
    store_lib.Store(store.uri).publish_base(1, write_base(tmp_path / "b1x", seed=7), fields)
  # ... and so does one that skips an iteration.
  with pytest.raises(store_lib.LostRace):
    store.publish_base(3, write_base(tmp_path / "b3", seed=3), fields)
  # Assert: the first base stays published, intact
  assert store.latest() == 1
  assert store.base_sha256(1) == winner
  local = store_lib.Store(store.uri, cache_dir=str(tmp_path / "c")).base_dir(1)
  assert _sha256(os.path.join(local, store_lib.MODEL)) == winner


def test_racer_stops_before_overwriting_a_published_base(created, tmp_path):
  """Fuser A reads LATEST, then fuser B publishes the same iteration with other weights
  while A is uploading: A loses, and the published base stays B's, intact."""
  # Prepare: A's upload lets B publish first
  store, _ = created
  fields = {"parent": {"iteration": 0, "sha256": store.base_sha256(0)}}
  a = store_lib.Store(store.uri)
  b_dir = write_base(tmp_path / "b", seed=2)
  original_upload = a.storage.upload
  calls = []

  def upload_after_b_publishes(local_path, name, move=False):
    if not calls:
      b_manifest = store_lib.Store(store.uri).publish_base(1, b_dir, fields)
      calls.append(b_manifest)
    original_upload(local_path, name, move=move)

  a.storage.upload = upload_after_b_publishes
  # Execute
  with pytest.raises(store_lib.LostRace):
    a.publish_base(1, write_base(tmp_path / "a", seed=1), fields)
  # Assert
  assert store.latest() == 1
  assert store.manifest(1) == calls[0]
  local = store_lib.Store(store.uri, cache_dir=str(tmp_path / "c")).base_dir(1)  # Verifies all.
  b_model = os.path.join(b_dir, store_lib.MODEL)
  assert _sha256(os.path.join(local, store_lib.MODEL)) == _sha256(b_model)


def test_contributions_protocol(created, tmp_path):
  # Prepare
  store, _ = created
  body = write_body(tmp_path / "alice.safetensors", seed=11)
  # Execute
  meta = store.put_contribution(0, "alice", body, _meta(store))
  # Assert
  assert meta["body_sha256"] == _sha256(body) and meta["contributor_id"] == "alice"
  assert store.has_contribution(0, "alice")
  # Execute / Assert
  # The same id again is refused, whoever tries.
  with pytest.raises(UserError, match="already contributed"):
    store_lib.Store(store.uri).put_contribution(0, "alice", write_body(tmp_path / "x", 12),
                                                _meta(store))
  # Prepare
  # A body without contribution.json (an upload cut short) is invisible.
  folder = "contributions/000000"
  store.storage.upload(write_body(tmp_path / "bob", 13), f"{folder}/bob/body.safetensors")
  # A contribution.json that breaks the schema, one that is not JSON, one under a foreign id.
  bad = dict(meta, contributor_id="carol", num_examples=-1)
  store.storage.write_bytes(f"{folder}/carol/contribution.json", json.dumps(bad).encode())
  store.storage.write_bytes(f"{folder}/dave/contribution.json", b"\xff{not json")
  erin = dict(meta, contributor_id="mallory")
  store.storage.write_bytes(f"{folder}/erin/contribution.json", json.dumps(erin).encode())

  # Execute
  found, rejected = store_lib.Store(store.uri).contributions(0)
  # Assert
  assert [c.contributor_id for c in found] == ["alice"]
  assert found[0].meta == meta
  assert found[0].body_name == "contributions/000000/alice/body.safetensors"
  reasons = {r["id"]: r["reason"] for r in rejected}
  assert sorted(reasons) == ["carol", "dave", "erin"]
  assert "num_examples" in reasons["carol"]
  assert "JSON" in reasons["dave"]
  assert "does not match its folder" in reasons["erin"]
  assert store.contributions(1) == ([], [])
  # Execute
  # The fuser's copy of the body is byte for byte what was uploaded.
  fetched, _ = store.fetch_body(found[0], str(tmp_path / "work"))
  # Assert
  assert _sha256(fetched) == meta["body_sha256"]


@pytest.mark.parametrize("bad_id", ["../x", "a/b", "", ".hidden", "x" * 129, "tab\there"])
def test_unsafe_contributor_ids_are_refused(created, tmp_path, bad_id):
  # Prepare
  store, _ = created
  # Execute
  with pytest.raises(UserError, match="not a safe name"):
    store.put_contribution(0, bad_id, write_body(tmp_path / "b", 1), _meta(store))
  # Assert
  assert store.storage.list_children("contributions") == []


# --- GCS only -----------------------------------------------------------------------


@pytest.fixture
def gcs_created(gcs_test_bucket, tmp_path, monkeypatch):
  monkeypatch.setenv("COLD_FUSION_GCS_RETRY_DEADLINE", "10")
  uri = f"gs://{gcs_test_bucket}/s-{uuid.uuid4().hex[:12]}"
  store = store_lib.Store(uri, cache_dir=str(tmp_path / "cache"))
  store.create(write_base(tmp_path / "base0"), {})
  return store


def _count_downloads(store):
  counted = []
  original = store.storage.download

  def download(name, local_path, *limit):
    counted.append(name)
    return original(name, local_path, *limit)

  store.storage.download = download
  return counted


def test_gcs_base_is_cached_and_not_fetched_twice(gcs_created, tmp_path):
  # Prepare
  cache = str(tmp_path / "cache")
  first = store_lib.Store(gcs_created.uri, cache_dir=cache)
  counted = _count_downloads(first)
  # Execute
  local = first.base_dir(0)
  # Assert
  assert local.startswith(cache)
  assert sorted(counted) == ["bases/000000/config.json", "bases/000000/model.safetensors",
                             "bases/000000/vocab.txt"]
  # Execute / Assert
  # Another process on the same machine (same cache): nothing is downloaded again.
  second = store_lib.Store(gcs_created.uri, cache_dir=cache)
  counted = _count_downloads(second)
  assert second.base_dir(0) == local
  assert counted == []
  # Prepare
  # A damaged cached file is fetched again (and only that one); strays are removed.
  with open(os.path.join(local, "vocab.txt"), "a", encoding="utf-8") as f:
    f.write("tampered\n")
  with open(os.path.join(local, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("left over from another store at this URI\n")
  # Execute / Assert
  assert second.base_dir(0) == local
  assert counted == ["bases/000000/vocab.txt"]
  assert sorted(os.listdir(local)) == ["config.json", "model.safetensors", "vocab.txt"]


def test_gcs_concurrent_downloads_into_one_cache(gcs_created, tmp_path):
  """Several processes (here threads, each with its own client) fill the same cache."""
  # Prepare
  cache = str(tmp_path / "shared-cache")
  results, errors = [], []

  def fetch():
    try:
      results.append(store_lib.Store(gcs_created.uri, cache_dir=cache).base_dir(0))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  # Execute
  threads = [threading.Thread(target=fetch) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  # Assert
  assert errors == [] and len(set(results)) == 1
  assert sorted(os.listdir(results[0])) == ["config.json", "model.safetensors", "vocab.txt"]


def test_gcs_server_dies_mid_publish_nothing_half_published(tmp_path, monkeypatch):
  """The server goes away while a base is uploading: a clear error, LATEST unmoved, no
  manifest (the base stays invisible), and a rerun after it is back publishes."""
  # Prepare: a store on an emulator that stops when the model uploads
  from gcs_emulator import GCSEmulator, loopback_no_proxy  # pylint: disable=g-import-not-at-top
  with GCSEmulator() as emulator:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.host)
    monkeypatch.setenv("NO_PROXY", loopback_no_proxy())
    monkeypatch.setenv("COLD_FUSION_GCS_RETRY_DEADLINE", "3")
    bucket = emulator.make_bucket("publish-bucket")
    store = store_lib.Store(f"gs://{bucket}/run", cache_dir=str(tmp_path / "cache"))
    store.create(write_base(tmp_path / "base0"), {})
    fields = {"parent": {"iteration": 0, "sha256": store.base_sha256(0)}}
    original = store.storage.upload

    def upload(local_path, name, move=False):
      if name.endswith(store_lib.MODEL):
        emulator.stop()
      original(local_path, name, move=move)

    store.storage.upload = upload
    # Execute
    with pytest.raises(UserError, match="did not answer"):
      store.publish_base(1, write_base(tmp_path / "b1", seed=1), fields)
    # Assert
    emulator.restart()
    again = store_lib.Store(store.uri, cache_dir=str(tmp_path / "cache"))
    assert again.latest() == 0
    assert not again.storage.exists("bases/000001/manifest.json")
    with pytest.raises(UserError, match="missing; base 1 is not complete"):
      again.manifest(1)
    # Execute: a rerun
    again.publish_base(1, write_base(tmp_path / "b1", seed=1), fields)
    # Assert
    assert again.latest() == 1
    again.base_dir(1)
