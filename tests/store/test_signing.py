"""Who may contribute: Ed25519 keys listed by the store's owner in contributors.json, signed
contribution.json, the keys program, and the contributor's checks before any training."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

import synthetic as h
from cold_fusion_tf import fusion
from cold_fusion_tf.errors import UserError
from cold_fusion_tf.store import layout
from cold_fusion_tf.store import signing
from cold_fusion_tf.tensors import safetensors_io as weights

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _program(tmp_path, name, *flags) -> subprocess.CompletedProcess:
  env = dict(os.environ, TMPDIR=str(tmp_path), COLD_FUSION_CACHE=str(tmp_path / "cache"),
             HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run([sys.executable, "-m", f"cold_fusion_tf.{name}", *flags], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=180, check=False)


def _key(tmp_path, name):
  path = str(tmp_path / f"{name}.key")
  public = signing.create_key(path, name)
  return signing.load_private_key(path), public, path


def _signed(store, cid, tensors, key, **meta_fields) -> dict:
  path = os.path.join(store.cache_dir, f"upload-{cid}.safetensors")
  os.makedirs(store.cache_dir, exist_ok=True)
  weights.save_safetensors(tensors, path)
  meta = {"base_sha256": store.base_sha256(0), "dataset": cid, "num_examples": 100,
          "steps": 10, "dev_metrics": {"score": 0.5}, **meta_fields}
  sign = (lambda m: signing.sign(m, key)) if key is not None else None
  return store.put_contribution(0, cid, path, meta, sign=sign)


def test_keys_program_creates_a_key_pair_and_lists_it_in_a_store(tmp_path):
  # Prepare
  store = h.new_store(tmp_path)
  out = tmp_path / "alice.key"
  # Execute
  created = _program(tmp_path, "keys", "--id=alice", f"--private_key={out}")
  again = _program(tmp_path, "keys", "--id=alice", f"--private_key={out}")
  line = next(l for l in created.stdout.splitlines() if l.strip().startswith('"alice": '))
  public = json.loads("{" + line + "}")["alice"]
  listed = _program(tmp_path, "keys", f"--store={store.uri}", "--id=alice",
                    f"--public_key={public}")
  # Assert
  assert created.returncode == 0, created.stderr
  assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
  assert signing.public_key_text(signing.load_private_key(str(out)).public_key()) == public
  assert f"--config.signing_key={out}" in created.stdout
  assert again.returncode == 2 and "exists" in again.stderr
  assert listed.returncode == 0, listed.stderr
  assert list(signing.load_keys(store)) == ["alice"]
  on_disk = store.read_json(layout.CONTRIBUTORS_FILE)
  assert on_disk == {"format_version": 1, "contributors": {"alice": public}}


def test_with_listed_keys_only_signed_contributions_of_listed_ids_count(tmp_path):
  # Prepare
  store = h.new_store(tmp_path)
  base = h.base_tensors(store)
  alice, alice_public, _ = _key(tmp_path, "alice")
  bob, bob_public, _ = _key(tmp_path, "bob")
  dave, dave_public, _ = _key(tmp_path, "dave")
  mallory, _, _ = _key(tmp_path, "mallory")
  _, carol_public, _ = _key(tmp_path, "carol")
  for cid, public in (("alice", alice_public), ("bob", bob_public), ("carol", carol_public),
                      ("dave", dave_public)):
    signing.add_key(store, cid, public)
  _signed(store, "alice", h.nudged(base, 1), alice)
  _signed(store, "bob", h.nudged(base, 2), bob)
  bob_json = store.storage.local_path("contributions/000000/bob/contribution.json")
  tampered = json.load(open(bob_json))
  tampered["num_examples"] = 10 ** 9  # changed after signing
  with open(bob_json, "w") as f:
    json.dump(tampered, f)
  _signed(store, "carol", h.nudged(base, 3), None)
  _signed(store, "dave", h.nudged(base, 4), alice)  # signed with someone else's key
  _signed(store, "mallory", h.nudged(base, 5), mallory)
  # Execute
  outcome = fusion.fuse(store, log=lambda m: None, settings=fusion.Settings(workers=1))
  # Assert
  assert [e["id"] for e in outcome.fused] == ["alice"]
  reasons = {r["id"]: r["reason"] for r in outcome.rejected}
  assert "signature does not verify" in reasons["bob"]
  assert "unsigned" in reasons["carol"]
  assert "signature does not verify with the key contributors.json lists for dave" in (
      reasons["dave"])
  assert "not listed in contributors.json" in reasons["mallory"]


def test_without_a_key_list_the_store_stays_open(tmp_path):
  # Prepare
  store = h.new_store(tmp_path)
  base = h.base_tensors(store)
  key, _, _ = _key(tmp_path, "alice")
  _signed(store, "alice", h.nudged(base, 1), key)
  _signed(store, "anyone", h.nudged(base, 2), None)
  # Execute
  outcome = fusion.fuse(store, log=lambda m: None, settings=fusion.Settings(workers=1))
  # Assert
  assert [e["id"] for e in outcome.fused] == ["alice", "anyone"] and outcome.rejected == []


def test_a_contributor_is_checked_against_the_key_list_before_training(tmp_path):
  # Prepare
  store = h.new_store(tmp_path)
  alice, alice_public, alice_path = _key(tmp_path, "alice")
  _, _, other_path = _key(tmp_path, "other")
  # Execute / Assert: an open store signs when asked and needs nothing otherwise.
  assert signing.signer(store, "alice", "") is None
  assert signing.signer(store, "alice", alice_path)({"a": 1}) == signing.sign({"a": 1}, alice)
  signing.add_key(store, "alice", alice_public)
  with pytest.raises(UserError, match="accepts only signed contributions"):
    signing.signer(store, "alice", "")
  with pytest.raises(UserError, match="does not list contributor 'bob'"):
    signing.signer(store, "bob", alice_path)
  with pytest.raises(UserError, match="is not the key contributors.json lists for 'alice'"):
    signing.signer(store, "alice", other_path)
  with pytest.raises(UserError, match="not an unencrypted PEM private key"):
    signing.signer(store, "alice", __file__)  # not a key file
  train = _program(tmp_path, "train", "--config=configs/demo.py", f"--store={store.uri}",
                   "--config.task=sst2", "--config.contributor_id=alice")
  assert train.returncode == 2
  assert train.stderr.strip().splitlines()[-1].startswith(
      f"error: {store.uri} accepts only signed contributions")
  assert not store.storage.list_children("contributions/000000")


def test_a_broken_key_list_stops_the_fuser_with_one_message(tmp_path):
  # Prepare
  store = h.new_store(tmp_path)
  h.contribute(store, "alice", h.nudged(h.base_tensors(store), 1))
  store.storage.write_bytes(layout.CONTRIBUTORS_FILE, json.dumps(
      {"format_version": 1, "contributors": {"alice": "ed25519:AAAA"}}).encode())
  # Execute / Assert
  with pytest.raises(UserError, match="contributors.json: key of alice: .* is not a valid"):
    fusion.fuse(store, log=lambda m: None, settings=fusion.Settings(workers=1))
  assert store.latest() == 0
  assert np.isfinite(h.base_tensors(store)["pooler.dense.bias"]).all()


def test_a_signing_contributor_counts_in_a_store_that_lists_its_key(tmp_path):
  # Prepare
  import tiny  # pylint: disable=g-import-not-at-top
  from cold_fusion_tf import store as store_lib  # pylint: disable=g-import-not-at-top
  path = tiny.make_store(str(tmp_path / "store"))
  store = store_lib.Store(path)
  key_path = str(tmp_path / "alice.key")
  signing.add_key(store, "alice", signing.create_key(key_path, "alice"))
  config = tiny.write_config(str(tmp_path / "config.py"), train=32)
  # Execute
  result = subprocess.run(
      tiny.train_command(config, path, str(tmp_path / "workdir"),
                         "--config.contributor_id=alice",
                         f"--config.signing_key={key_path}"),
      env=tiny.env(), capture_output=True, text=True, timeout=300, check=False)
  # Assert
  assert result.returncode == 0, result.stderr[-3000:]
  meta = store.contribution_meta(0, "alice")
  assert meta["signature"] and signing.problem(meta, signing.load_keys(store)) is None
  outcome = fusion.fuse(store, log=lambda m: None, settings=fusion.Settings(workers=1))
  assert [e["id"] for e in outcome.fused] == ["alice"] and outcome.rejected == []
