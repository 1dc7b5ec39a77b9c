"""The fuser against hostile or broken contributions: whatever one contribution holds, it is
rejected with its reason and the fusion goes on; no contributor (or handful of ids) decides
the base; the fused base is checked before it is published. Tiny synthetic stores."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import time

import numpy as np
import pytest

import synthetic as h
from cold_fusion_tf import fusion
from cold_fusion_tf import store as store_lib
from cold_fusion_tf.errors import UserError
from cold_fusion_tf.fusion import methods as fm
from cold_fusion_tf.fusion import validation
from cold_fusion_tf.store import layout
from cold_fusion_tf.tensors import safetensors_io as weights

FOLDER = "contributions/000000"


def _settings(**kwargs) -> fusion.Settings:
  return fusion.Settings(workers=2, **kwargs)


def _honest(store, count=2, start=0):
  base = h.base_tensors(store)
  bodies = [h.nudged(base, start + i) for i in range(count)]
  for i, body in enumerate(bodies):
    h.contribute(store, f"honest{start + i}", body)
  return base, bodies


def _meta_text(store, cid, **fields) -> dict:
  meta = {"format_version": 1, "base_iteration": 0, "base_sha256": store.base_sha256(0),
          "body_sha256": "0" * 64, "contributor_id": cid, "dataset": cid, "num_examples": 10,
          "steps": 1, "dev_metrics": {}}
  meta.update(fields)
  return meta


def _folder(store, cid) -> str:
  path = store.storage.local_path(f"{FOLDER}/{cid}")
  os.makedirs(path, exist_ok=True)
  return path


def _write(store, cid, name, data: bytes) -> str:
  path = os.path.join(_folder(store, cid), name)
  with open(path, "wb") as f:
    f.write(data)
  return path


def _raw_contribution(store, cid, text: str, body: bytes | None = None) -> None:
  """A contribution.json with exactly ``text`` (and a body, when given)."""
  if body is not None:
    _write(store, cid, store_lib.BODY, body)
  _write(store, cid, store_lib.CONTRIBUTION, text.encode())


def _body_file(store, cid, data: bytes) -> None:
  """A body of exactly ``data`` with a matching contribution.json."""
  import hashlib  # pylint: disable=g-import-not-at-top
  meta = _meta_text(store, cid, body_sha256=hashlib.sha256(data).hexdigest(),
                    body_size=len(data))
  _raw_contribution(store, cid, json.dumps(meta), data)


def _safetensors(header: dict | str, data: bytes = b"") -> bytes:
  raw = header if isinstance(header, str) else json.dumps(header)
  raw = raw.encode()
  return struct.pack("<Q", len(raw)) + raw + data


def _fuse_in_thread(store, settings, timeout=120):
  """fusion.fuse in a thread: (outcome, log) or a test failure if it hangs."""
  result, logged = {}, []

  def target():
    try:
      result["outcome"] = fusion.fuse(store, log=logged.append, settings=settings)
    except BaseException as e:  # pylint: disable=broad-except
      result["error"] = e

  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  thread.join(timeout)
  assert not thread.is_alive(), "the fuser hangs"
  if "error" in result:
    raise result["error"]
  return result["outcome"], logged


def _sharing_a_direction(store, base, ids: list, spread: float):
  """Contributions of ``ids`` whose updates share one direction, each with noise of
  ``spread``: (the shared body, the contributed bodies)."""
  shared = h.nudged(base, 99, scale=0.02)
  bodies = [h.nudged(shared, i, scale=spread) for i in range(len(ids))]
  for cid, body in zip(ids, bodies):
    h.contribute(store, cid, body)
  return shared, bodies


def _reasons(outcome) -> dict:
  return {r["id"]: r["reason"] for r in outcome.rejected}


# ----------------------------------------------------------------------------------------------
# One contribution never stops the fusion.


def test_hostile_contribution_json_is_rejected_and_the_rest_is_fused(tmp_path):
  # Prepare
  store = h.new_store(tmp_path)
  base, bodies = _honest(store)
  meta = json.dumps(_meta_text(store, "huge-count"))
  _raw_contribution(store, "huge-count", meta.replace('"num_examples": 10',
                                                      '"num_examples": 1' + "0" * 400))
  _raw_contribution(store, "long-int", json.dumps(_meta_text(store, "long-int")).replace(
      '"steps": 1', '"steps": ' + "7" * 5000))
  deep = json.dumps(_meta_text(store, "deep")).replace(
      '"dev_metrics": {}', '"dev_metrics": ' + "[" * 5_000 + "]" * 5_000)
  _raw_contribution(store, "deep", deep)
  _raw_contribution(store, "nan-token", json.dumps(_meta_text(store, "nan-token")).replace(
      '"dev_metrics": {}', '"dev_metrics": {"score": NaN}'))
  _raw_contribution(store, "float-count", json.dumps(_meta_text(store, "float-count")).replace(
      '"num_examples": 10', '"num_examples": 1.7e308'))
  _raw_contribution(store, "not-an-object", "[1, 2, 3]")
  os.makedirs(os.path.join(_folder(store, "json-is-a-dir"), store_lib.CONTRIBUTION))
  big = os.path.join(_folder(store, "json-400mib"), store_lib.CONTRIBUTION)
  with open(big, "wb") as f:
    f.truncate(400 << 20)  # sparse: costs no disk, but 400 MiB to whoever reads it
  outside = tmp_path / "outside.json"
  outside.write_text(json.dumps(_meta_text(store, "json-symlink")))
  os.symlink(outside, os.path.join(_folder(store, "json-symlink"), store_lib.CONTRIBUTION))
  with open(store.storage.local_path(f"{FOLDER}/folder-is-a-file"), "w") as f:
    f.write("x")
  expected = {"huge-count": "an integer of 401 characters", "long-int": "an integer of 5000",
              "deep": "nested 5001 deep", "nan-token": "NaN is not a JSON number",
              "float-count": "num_examples", "not-an-object": "expected a JSON object",
              "json-is-a-dir": "is a directory", "json-400mib": "more than the 16384 allowed",
              "json-symlink": "leads out of the store", "folder-is-a-file": "is a file, not a folder"}
  # Execute
  outcome, logged = _fuse_in_thread(store, _settings())
  # Assert
  assert outcome.published == 1
  assert [e["id"] for e in outcome.fused] == ["honest0", "honest1"]
  reasons = _reasons(outcome)
  assert set(reasons) == set(expected)
  for cid, words in expected.items():
    assert words in reasons[cid], (cid, reasons[cid])
    assert any(m.startswith(f"rejected {cid}: ") for m in logged), cid
  assert {r["id"] for r in store.manifest(1)["fusion"]["rejected"]} == set(expected)
  assert h.base_tensors(store)["pooler.dense.bias"] == pytest.approx(
      (bodies[0]["pooler.dense.bias"] + bodies[1]["pooler.dense.bias"]) / 2, rel=1e-6)


def test_hostile_bodies_are_rejected_without_hanging_or_reading_them_whole(tmp_path):
  # Prepare
  store = h.new_store(tmp_path)
  _honest(store)
  base_file = store.storage.local_path("bases/000000/model.safetensors")
  body = _folder(store, "fifo")
  os.mkfifo(os.path.join(body, store_lib.BODY))  # opening it for reading would block
  _raw_contribution(store, "fifo", json.dumps(_meta_text(store, "fifo")))
  os.symlink("/dev/zero", os.path.join(_folder(store, "device"), store_lib.BODY))
  _raw_contribution(store, "device", json.dumps(_meta_text(store, "device")))
  os.symlink(base_file, os.path.join(_folder(store, "link-out"), store_lib.BODY))
  _raw_contribution(store, "link-out", json.dumps(_meta_text(store, "link-out")))
  os.makedirs(os.path.join(_folder(store, "body-dir"), store_lib.BODY))
  _raw_contribution(store, "body-dir", json.dumps(_meta_text(store, "body-dir")))
  _body_file(store, "deep-header", _safetensors("[" * 100 + "]" * 100))
  _body_file(store, "huge-shape", _safetensors(
      {"w": {"dtype": "F32", "shape": [10 ** 30], "data_offsets": [0, 4]}}, b"\0" * 4))
  _body_file(store, "long-offset", _safetensors(
      '{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4' + "0" * 5000 + "]}}",
      b"\0" * 4))
  many = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(200)}
  _body_file(store, "many-tensors", _safetensors(many))
  empties = {f"empty{i:07d}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
             for i in range(100_000)}
  _body_file(store, "huge-header", _safetensors(empties))
  sparse = os.path.join(_folder(store, "sparse-2gib"), store_lib.BODY)
  with open(sparse, "wb") as f:
    f.truncate(2 << 30)
  _raw_contribution(store, "sparse-2gib", json.dumps(_meta_text(store, "sparse-2gib",
                                                                body_size=2 << 30)))
  expected = {"fifo": "is a FIFO", "device": "leads out of the store", "link-out": "is a symbolic link",
              "body-dir": "is a directory", "deep-header": "nested 100 deep",
              "huge-shape": "malformed header entry", "long-offset": "an integer of 5001",
              "many-tensors": "200 tensors in the header, more than",
              "huge-header": "more than the", "sparse-2gib": "a body of the base's layout"}
  # Execute
  outcome, _ = _fuse_in_thread(store, _settings())
  # Assert
  assert outcome.published == 1 and [e["id"] for e in outcome.fused] == ["honest0", "honest1"]
  reasons = _reasons(outcome)
  assert set(reasons) == set(expected)
  for cid, words in expected.items():
    assert words in reasons[cid], (cid, reasons[cid])


def test_header_reader_bounds_what_a_file_may_cost(tmp_path):
  # Prepare
  path = tmp_path / "x.safetensors"
  path.write_bytes(_safetensors({f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
                                 for i in range(50)}))
  # Execute / Assert
  assert len(weights.read_header(str(path))) == 50
  with pytest.raises(UserError, match="50 tensors in the header, more than the 10"):
    weights.read_header(str(path), max_tensors=10)
  with pytest.raises(UserError, match="more than the 100 a body"):
    weights.read_header(str(path), max_header_bytes=100)


def test_a_plan_written_before_a_crash_does_not_crash_the_rerun(tmp_path):
  # Prepare: an earlier fuser planned a contribution claiming 10**400 examples, then crashed
  # converting it (the plan stays in the store).
  store = h.new_store(tmp_path)
  _honest(store)
  entry = ('{"id": "honest0", "sha256": "' + "0" * 64 + '", "num_examples": 1' + "0" * 400
           + "}")
  plan = ('{"format_version": 1, "iteration": 1, "parent": {"iteration": 0, "sha256": "'
          + store.base_sha256(0) + '"}, "fusion": {"method": "mean", "contributions": ['
          + entry + '], "rejected": []}}')
  store.storage.write_bytes(layout.plan_name(1), plan.encode())
  # Execute
  first, logged = _fuse_in_thread(store, _settings())
  # Assert: planned again and published; the new plan records the fusion.
  assert first.published == 1 and [e["id"] for e in first.fused] == ["honest0", "honest1"]
  assert any("cannot be followed" in m and "planning again" in m for m in logged)
  replanned = store.read_json(layout.plan_name(1))
  assert [e["id"] for e in replanned["fusion"]["contributions"]] == ["honest0", "honest1"]


# ----------------------------------------------------------------------------------------------
# One contributor must not decide the base.


def test_one_body_of_huge_values_is_never_published(tmp_path):
  # Prepare: defaults (mean, min_contributions=1).
  alone = h.new_store(tmp_path, name="alone")
  base = h.base_tensors(alone)
  huge = {n: np.full(v.shape, 3e38, np.float32) for n, v in base.items()}
  h.contribute(alone, "huge", huge)
  paired = h.new_store(tmp_path, name="paired")
  honest = h.nudged(base, 1)
  h.contribute(paired, "huge", huge)
  h.contribute(paired, "honest", honest)
  # Execute
  one = fusion.fuse(alone, log=lambda m: None, settings=_settings())
  two = fusion.fuse(paired, log=lambda m: None, settings=_settings())
  # Assert
  assert one.published is None and alone.latest() == 0
  assert "is above its bound" in _reasons(one)["huge"]
  assert two.published == 1 and [e["id"] for e in two.fused] == ["honest"]
  fused = h.base_tensors(paired)
  assert all(np.array_equal(fused[n], honest[n]) for n in base)


def test_sybil_ids_with_a_huge_update_are_rejected_and_honest_fine_tuning_is_fused(tmp_path):
  # Prepare: the same large update (2.5 per coordinate) under 3 ids, each with its own
  # noise, and 3 honest contributors.
  store = h.new_store(tmp_path)
  base, honest = _honest(store, 3)
  for i in range(3):
    sybil = {n: (v + 2.5 + 1e-3 * np.random.default_rng(i).normal(size=v.shape)).astype(
        np.float32) for n, v in base.items()}
    h.contribute(store, f"sybil{i}", sybil)
  # Execute
  outcome = fusion.fuse(store, log=lambda m: None, settings=_settings())
  # Assert
  assert [e["id"] for e in outcome.fused] == ["honest0", "honest1", "honest2"]
  assert all("is above its bound" in _reasons(outcome)[f"sybil{i}"] for i in range(3))
  fused = h.base_tensors(store)
  moved = max(float(np.abs(fused[n] - base[n]).max()) for n in base)
  assert moved < 0.05


def test_near_empty_sybils_do_not_get_honest_updates_rejected(tmp_path):
  # Prepare: 4 ids that send back the base (almost unchanged), 3 honest contributors.
  store = h.new_store(tmp_path)
  base, _ = _honest(store, 3)
  for i in range(4):
    h.contribute(store, f"empty{i}", h.nudged(base, 50 + i, scale=1e-7))
  # Execute
  outcome = fusion.fuse(store, log=lambda m: None, settings=_settings())
  # Assert
  assert {"honest0", "honest1", "honest2"} <= {e["id"] for e in outcome.fused}
  assert not any(r["id"].startswith("honest") for r in outcome.rejected)


def test_update_concentrated_in_one_layernorm_vector_is_caught_by_the_tensor_bound(tmp_path):
  # Prepare: 3 honest updates and one of 1.45x the median norm, all in one LayerNorm vector
  # (its whole norm passes the outlier check).
  store = h.new_store(tmp_path)
  base, honest = _honest(store, 3)
  norm = np.median([np.sqrt(sum(np.sum((b[n].astype(np.float64) - base[n]) ** 2) for n in base))
                    for b in honest])
  focused = {n: v.copy() for n, v in base.items()}
  name = "embeddings.LayerNorm.weight"
  focused[name] = (base[name] + 1.45 * norm / np.sqrt(base[name].size)).astype(np.float32)
  h.contribute(store, "focused", focused)
  # The honest updates move each tensor by about 1% of its norm: a bound of 5x that.
  settings = _settings(max_tensor_update_ratio=0.05)
  # Execute
  loose = fusion.fuse(store, log=lambda m: None, settings=_settings(max_tensor_update_ratio=0))
  store.storage.delete_prefix("fusion")
  store.storage.delete_prefix("bases/000001")
  store.storage.write_bytes("LATEST", b"0\n")
  tight = fusion.fuse(store, log=lambda m: None, settings=settings)
  # Assert: without the tensor bound it passes; with it, it is rejected.
  assert "focused" in [e["id"] for e in loose.fused]
  assert [e["id"] for e in tight.fused] == ["honest0", "honest1", "honest2"]
  assert f"tensor {name}: update norm" in _reasons(tight)["focused"]


def test_clipping_scales_a_large_update_onto_the_bound(tmp_path):
  # Prepare
  store = h.new_store(tmp_path)
  base, honest = _honest(store, 1)
  big = {n: (v + 10.0).astype(np.float32) for n, v in base.items()}
  h.contribute(store, "big", big)
  settings = _settings(clip_updates=True, max_tensor_update_ratio=0)
  # Execute
  outcome = fusion.fuse(store, log=lambda m: None, settings=settings)
  # Assert: big's update is scaled to the whole-update bound (0.2 of the base's norm).
  assert [e["id"] for e in outcome.fused] == ["big", "honest0"]
  entry = next(e for e in outcome.fused if e["id"] == "big")
  base_norm = np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in base.values()))
  big_norm = np.sqrt(sum(np.sum((big[n].astype(np.float64) - base[n]) ** 2) for n in base))
  factor = 0.2 * base_norm / big_norm
  assert set(entry["clip"]) == set(base) and all(
      f == pytest.approx(factor, rel=1e-6) for f in entry["clip"].values())
  fused = h.base_tensors(store)
  for n in base:
    expected = (base[n] + factor * 10.0 + honest[0][n]) / 2
    np.testing.assert_allclose(fused[n], expected, rtol=1e-5, atol=1e-5)


def test_an_update_against_the_others_is_rejected_by_the_direction_check(tmp_path):
  # Prepare: 3 honest updates that share a direction, one that goes the other way (within
  # the norm bounds).
  store = h.new_store(tmp_path)
  base = h.base_tensors(store)
  shared, _ = _sharing_a_direction(store, base, ["honest0", "honest1", "honest2"], 0.01)
  h.contribute(store, "against", {n: (base[n] - 2 * (shared[n] - base[n])).astype(np.float32)
                                  for n in base})
  # Execute
  outcome = fusion.fuse(store, log=lambda m: None, settings=_settings())
  # Assert
  assert [e["id"] for e in outcome.fused] == ["honest0", "honest1", "honest2"]
  assert "points away from the others'" in _reasons(outcome)["against"]


@pytest.mark.parametrize("attack", ["own update x -4", "minus the others' sum"])
def test_one_update_against_the_others_does_not_get_them_rejected(tmp_path, attack):
  # Prepare: 3 honest updates, and one against them that drags the mean of any three:
  # either its own fine-tune (sharing their direction) times -4, or minus the sum of the
  # honest updates (random, so nearly orthogonal: every update is then minus the sum of the
  # others, and its larger norm tells it apart).
  store = h.new_store(tmp_path)
  base = h.base_tensors(store)
  shared = h.nudged(base, 99, scale=0.02) if attack == "own update x -4" else base
  honest = [h.nudged(shared, i, scale=0.01) for i in range(3)]
  for i, body in enumerate(honest):
    h.contribute(store, f"honest{i}", body)
  if attack == "own update x -4":
    own = h.nudged(shared, 7, scale=0.01)
    against = {n: base[n] - 4 * (own[n] - base[n]) for n in base}
  else:
    against = {n: base[n] - sum(b[n] - base[n] for b in honest) for n in base}
  h.contribute(store, "against", {n: v.astype(np.float32) for n, v in against.items()})
  # Execute: with the outlier check off (a store whose updates are small against the base's
  # norm lets an update several times the median through it)
  outcome = fusion.fuse(store, log=lambda m: None, settings=_settings(max_update_z=0))
  # Assert: only the update against the others is rejected; the base is the honest mean.
  assert [e["id"] for e in outcome.fused] == ["honest0", "honest1", "honest2"]
  assert list(_reasons(outcome)) == ["against"]
  assert "points away from the others'" in _reasons(outcome)["against"]
  fused = h.base_tensors(store)
  for n in base:
    np.testing.assert_allclose(fused[n], np.mean([b[n] for b in honest], axis=0), atol=1e-6)


def test_a_majority_of_ids_is_never_rejected_by_the_direction_check(tmp_path):
  # Prepare: 2 updates that share a direction, 3 that point nowhere in particular.
  store = h.new_store(tmp_path)
  base = h.base_tensors(store)
  _sharing_a_direction(store, base, ["pair0", "pair1"], 0.005)
  for i in range(3):
    h.contribute(store, f"other{i}", h.nudged(base, 10 + i, scale=0.02))
  # Execute: a direction check that would reject any update below cosine 0.99
  outcome = fusion.fuse(store, log=lambda m: None, settings=_settings(min_cosine=0.99))
  # Assert: two of the five are rejected, no more.
  assert len(outcome.fused) == 3 and len(outcome.rejected) == 2
  assert all("points away" in r["reason"] for r in outcome.rejected)


def test_weighted_caps_an_inflated_claim_of_examples(tmp_path):
  # Prepare: one id claims 10**15 examples, two honest ones 100 each.
  store = h.new_store(tmp_path)
  base = h.base_tensors(store)
  bodies = [h.nudged(base, i) for i in range(3)]
  for cid, body, count in zip(["greedy", "honest0", "honest1"], bodies, [10 ** 15, 100, 100]):
    h.contribute(store, cid, body, num_examples=count)
  # Execute
  outcome = fusion.fuse(store, log=lambda m: None, settings=_settings(method="weighted"))
  # Assert: the claim counts 4x the median (400).
  assert [e["weight"] for e in outcome.fused] == [400.0, 100.0, 100.0]
  fused = h.base_tensors(store)
  for n in base:
    expected = fm.weighted(base[n], [b[n] for b in bodies], np.array([400.0, 100.0, 100.0]),
                           name=n)
    assert np.array_equal(fused[n], expected)


def test_weighted_claims_at_the_limit_cannot_overflow(tmp_path):
  # Prepare: two ids claim the largest count allowed, another more than that.
  store = h.new_store(tmp_path)
  base = h.base_tensors(store)
  bodies = [h.nudged(base, i) for i in range(2)]
  h.contribute(store, "max0", bodies[0], num_examples=2 ** 53)
  h.contribute(store, "max1", bodies[1], num_examples=2 ** 53)
  _raw_contribution(store, "beyond", json.dumps(_meta_text(store, "beyond")).replace(
      '"num_examples": 10', '"num_examples": 17' + "0" * 307))
  # Execute
  outcome = fusion.fuse(store, log=lambda m: None,
                        settings=_settings(method="weighted", max_weight_ratio=0))
  # Assert
  assert [e["id"] for e in outcome.fused] == ["max0", "max1"]
  assert "integer" in _reasons(outcome)["beyond"]
  fused = h.base_tensors(store)
  for n in base:
    assert np.isfinite(fused[n]).all()
    np.testing.assert_allclose(fused[n], (bodies[0][n] + bodies[1][n]) / 2, rtol=1e-6)
  assert fm.weighted(np.zeros(2), [np.ones(2), np.ones(2)], np.array([1.7e308, 1.7e308]),
                     name="w").tolist() == [1.0, 1.0]


def test_identical_bodies_count_for_the_earliest_upload(tmp_path):
  # Prepare: alice uploads, then mallory re-uploads alice's body under an id that sorts first.
  store = h.new_store(tmp_path)
  base = h.base_tensors(store)
  alice = h.nudged(base, 1)
  h.contribute(store, "alice", alice)
  h.contribute(store, "bob", h.nudged(base, 2))
  time.sleep(0.05)  # past the file system's clock tick
  h.contribute(store, "0-mallory", alice)
  assert (store.storage.stat(f"{FOLDER}/0-mallory/{store_lib.BODY}").created_ns
          > store.storage.stat(f"{FOLDER}/alice/{store_lib.BODY}").created_ns)
  # Execute
  outcome = fusion.fuse(store, log=lambda m: None, settings=_settings())
  # Assert
  assert [e["id"] for e in outcome.fused] == ["alice", "bob"]
  reason = _reasons(outcome)["0-mallory"]
  assert "as contributor alice, uploaded earlier" in reason and "earliest upload" in reason


# ----------------------------------------------------------------------------------------------
# The fused base is checked before it is published.


def test_a_fused_base_that_is_not_finite_is_never_published(tmp_path):
  # Prepare: a server optimizer step so large that the fused base overflows.
  store = h.new_store(tmp_path)
  _honest(store)
  wild = _settings(server_optimizer={"lr": 1e45, "momentum": 0.0, "nesterov": False})
  # Execute
  with pytest.raises(UserError, match="NaN or infinite values .*nothing was published"):
    fusion.fuse(store, log=lambda m: None, settings=wild)
  # Assert: nothing published; with sane settings the next attempt plans again and publishes.
  assert store.latest() == 0
  assert not store.storage.exists(f"bases/000001/{store_lib.MANIFEST}")
  assert store.read_json(layout.plan_name(1))["fused_check_failed"]
  outcome = fusion.fuse(store, log=lambda m: None, settings=_settings())
  assert outcome.published == 1
  assert all(np.isfinite(v).all() for v in h.base_tensors(store).values())


def test_a_fused_base_too_far_from_its_parent_is_never_published(tmp_path):
  # Prepare: task arithmetic extrapolating 1000x past the mean.
  store = h.new_store(tmp_path)
  _honest(store)
  far = _settings(method="task_arithmetic", params={"scale": 1000.0})
  # Execute / Assert
  with pytest.raises(UserError, match="away from its parent, above the bound"):
    fusion.fuse(store, log=lambda m: None, settings=far)
  assert store.latest() == 0


# ----------------------------------------------------------------------------------------------
# Names printed to a terminal.


def test_names_from_the_store_are_escaped_in_the_output(tmp_path):
  # Prepare: a folder whose name carries a terminal escape sequence and a line break.
  store = h.new_store(tmp_path)
  _honest(store)
  os.makedirs(store.storage.local_path(FOLDER) + "/evil\x1b[2J\nname")
  os.makedirs(os.fsencode(store.storage.local_path(FOLDER)) + b"/not-utf8-\xff")
  # Execute
  outcome, logged = _fuse_in_thread(store, _settings())
  # Assert
  assert outcome.published == 1
  lines = sorted(m for m in logged if m.startswith("rejected "))
  assert len(lines) == 2 and "evil?[2J?name" in lines[0] and "not-utf8-?" in lines[1]
  store.manifest(1)  # the rejections are recorded, escaped as JSON
  assert not any(c in m for m in logged for c in "\x1b\n")


def test_an_iteration_folder_that_leads_out_of_the_store_counts_for_nothing(tmp_path):
  # Prepare: contributions/000000 is a link to a folder outside the store.
  store = h.new_store(tmp_path)
  outside = tmp_path / "elsewhere"
  outside.mkdir()
  os.makedirs(store.storage.local_path("contributions"), exist_ok=True)
  os.symlink(outside, store.storage.local_path(FOLDER))
  # Execute
  outcome = fusion.fuse(store, log=lambda m: None, settings=_settings())
  # Assert: no traceback, nothing published, the reason given.
  assert outcome.published is None and store.latest() == 0
  assert "leads out of the store" in _reasons(outcome)[FOLDER]


def test_cosines_with_the_others_mean_match_a_direct_computation(tmp_path):
  # Prepare: 5 bodies, one update clipped in one tensor.
  from cold_fusion_tf.fusion import trust  # pylint: disable=g-import-not-at-top
  from cold_fusion_tf.tensors import streaming  # pylint: disable=g-import-not-at-top
  base = h.random_body()
  bodies = [h.nudged(base, i, scale=0.1) for i in range(5)]
  paths = []
  for i, tensors in enumerate([base] + bodies):
    paths.append(str(tmp_path / f"{i}.safetensors"))
    weights.save_safetensors(tensors, paths[-1])
  files = [weights.BodyFile(p) for p in paths]
  factors = [{}, {"pooler.dense.weight": 0.25}, {}, {}, {}]
  names = sorted(base)
  deltas = [np.concatenate([(b[n].astype(np.float64) - base[n]).ravel()
                            * f.get(n, 1.0) for n in names]) for b, f in zip(bodies, factors)]
  # Execute
  terms = streaming.direction_terms(files[1:], files[0].specs(), files[0], factors,
                                    chunk_elements=7)
  got = trust.cosines(*terms, [f"c{i}" for i in range(5)])
  # Assert
  for i, d in enumerate(deltas):
    others = np.mean([e for j, e in enumerate(deltas) if j != i], axis=0)
    expected = d @ others / np.linalg.norm(d) / np.linalg.norm(others)
    assert got[f"c{i}"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
  for f in files:
    f.close()


# ----------------------------------------------------------------------------------------------
# What was validated is what is fused.


def _overwrite_in_place(path: str, tensors: dict) -> None:
  """Writes ``tensors`` over the data of the safetensors file ``path``: the same file (an open
  descriptor sees the change), the same size."""
  header = weights.read_header(path)
  with open(path, "r+b") as f:
    start = 8 + struct.unpack("<Q", f.read(8))[0]
    for name, (_, _, (begin, _)) in header.items():
      f.seek(start + begin)
      f.write(np.ascontiguousarray(tensors[name], np.float32).tobytes())


def test_a_body_others_may_write_is_fused_as_validated_whatever_is_written_into_it_later(
    tmp_path):
  # Prepare: a waiting fuser validated 4 contributions; then the owner of one, which others
  # than the fuser's user may write (here: anyone), writes into it an update 150x the others'.
  store = h.new_store(tmp_path)
  base, bodies = _honest(store, 3)
  sneaky = h.nudged(base, 5)
  h.contribute(store, "sneaky", sneaky)
  os.chmod(h.body_path(store, "sneaky"), 0o666)
  validations = fusion.Validations(store, _settings(), lambda m: None)
  assert validations.refresh() == 4
  _overwrite_in_place(h.body_path(store, "sneaky"),
                      {n: (v + 1.5).astype(np.float32) for n, v in base.items()})
  # Execute
  try:
    outcome = fusion.fuse(store, log=lambda m: None, settings=_settings(),
                          validations=validations)
  finally:
    validations.close()
  # Assert: the base is the mean of the 4 bodies as they were validated.
  assert outcome.published == 1 and len(outcome.fused) == 4
  fused = h.base_tensors(store)
  for n in base:
    np.testing.assert_allclose(fused[n], np.mean([b[n] for b in bodies + [sneaky]], axis=0),
                               atol=1e-6)


def _replaced_after_listing(store, alice: dict, base: dict, settings) -> dict:
  """mallory's body (junk, uploaded before alice's) is replaced by a copy of alice's after
  the fuser listed the contributions, before it read them: the rejections of the fusion."""
  alice_path = os.path.join(str(store.cache_dir), "alice.safetensors")
  os.makedirs(store.cache_dir, exist_ok=True)
  weights.save_safetensors(alice, alice_path)
  with open(alice_path, "rb") as f:
    alice_bytes = f.read()
  sha = hashlib.sha256(alice_bytes).hexdigest()
  prefix = f"{FOLDER}/0-mallory"
  store.storage.write_bytes(f"{prefix}/{store_lib.BODY}", b"junk")
  store.storage.write_bytes(f"{prefix}/{store_lib.CONTRIBUTION}", json.dumps(
      _meta_text(store, "0-mallory", body_sha256=sha, body_size=len(alice_bytes))).encode())
  time.sleep(0.05)  # past the storage's clock tick
  h.contribute(store, "alice", alice)
  h.contribute(store, "bob", h.nudged(base, 2))
  validations = fusion.Validations(store, settings, lambda m: None)
  try:
    found, _ = validation.candidates(store, 0, store.base_sha256(0), lambda m: None)
    time.sleep(0.05)
    store.storage.write_bytes(f"{prefix}/{store_lib.BODY}", alice_bytes)
    validations.check(found)
    outcome = fusion.fuse(store, log=lambda m: None, settings=settings,
                          validations=validations)
  finally:
    validations.close()
  assert [e["id"] for e in outcome.fused] == ["alice", "bob"]
  return _reasons(outcome)


def test_a_body_replaced_after_the_listing_counts_as_uploaded_when_it_was_replaced(tmp_path):
  # Prepare
  store = h.new_store(tmp_path)
  base = h.base_tensors(store)
  # Execute
  reasons = _replaced_after_listing(store, h.nudged(base, 1), base, _settings())
  # Assert: mallory's copy is the later upload, not alice's body.
  assert "as contributor alice, uploaded earlier" in reasons["0-mallory"]


def test_a_gcs_body_replaced_after_the_listing_counts_as_uploaded_when_it_was_replaced(
    tmp_path, gcs_emulator):
  # Prepare
  local = h.new_store(tmp_path, name="local")
  base = h.base_tensors(local)
  store = store_lib.Store(f"gs://{gcs_emulator.make_bucket()}/run",
                          cache_dir=str(tmp_path / "gcs-cache"))
  store.create(local.base_dir(0), {"source_model": "synthetic"})
  # Execute
  reasons = _replaced_after_listing(store, h.nudged(base, 1), base, _settings())
  # Assert
  assert "as contributor alice, uploaded earlier" in reasons["0-mallory"]


def test_a_copy_of_the_base_does_not_count(tmp_path):
  # Prepare: 2 honest contributors and a free rider that uploads the base unchanged (its
  # file is byte for byte the base's).
  store = h.new_store(tmp_path)
  base, bodies = _honest(store)
  h.contribute(store, "free-rider", base)
  with open(h.body_path(store, "free-rider"), "rb") as f:
    assert hashlib.sha256(f.read()).hexdigest() == store.base_sha256(0)
  # Execute
  outcome = fusion.fuse(store, log=lambda m: None, settings=_settings())
  # Assert: the base moves by the mean of the honest updates, not 2/3 of it.
  assert [e["id"] for e in outcome.fused] == ["honest0", "honest1"]
  assert "the body is the base itself" in _reasons(outcome)["free-rider"]
  fused = h.base_tensors(store)
  for n in base:
    np.testing.assert_allclose(fused[n], (bodies[0][n] + bodies[1][n]) / 2, atol=1e-6)


def test_a_gcs_outage_while_validating_rejects_no_one_and_publishes_nothing(
    tmp_path, monkeypatch):
  # Prepare: 3 contributions listed, then Cloud Storage stops answering before their bodies
  # are downloaded.
  from gcs_emulator import GCSEmulator, loopback_no_proxy  # pylint: disable=g-import-not-at-top
  from cold_fusion_tf.store.backends.gcs import GCSError  # pylint: disable=g-import-not-at-top
  with GCSEmulator() as emulator:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.host)
    monkeypatch.setenv("NO_PROXY", loopback_no_proxy())
    monkeypatch.setenv("COLD_FUSION_GCS_RETRY_DEADLINE", "2")
    local = h.new_store(tmp_path, name="local")
    store = store_lib.Store(f"gs://{emulator.make_bucket('outage')}/run",
                            cache_dir=str(tmp_path / "gcs-cache"))
    store.create(local.base_dir(0), {"source_model": "synthetic"})
    _honest(store, 3)
    validations = fusion.Validations(store, _settings(), lambda m: None)
    try:
      found, _ = validation.candidates(store, 0, store.base_sha256(0), lambda m: None)
      emulator.stop()
      # Execute
      with pytest.raises(GCSError, match="did not answer|Could not reach") as raised:
        validations.check(found)
      emulator.restart()
      outcome = fusion.fuse(store, log=lambda m: None, settings=_settings(),
                            validations=validations)
    finally:
      validations.close()
  # Assert: one error, no contribution blamed; once the service is back all 3 are fused.
  assert "\n" not in str(raised.value)
  assert [e["id"] for e in outcome.fused] == ["honest0", "honest1", "honest2"]
  assert outcome.rejected == []
