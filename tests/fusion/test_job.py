"""The fusion job in-process: validation and rejections, streaming methods, the plan, the
server optimizer, quorum and waiting. Tiny synthetic bodies, no TensorFlow model."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import safetensors.numpy

import synthetic as h
from cold_fusion_tf import fusion
from cold_fusion_tf.tensors import streaming as fusion_io
from cold_fusion_tf.fusion import methods as fm
from cold_fusion_tf.fusion import server_optimizer
from cold_fusion_tf import store as store_lib
from cold_fusion_tf.store import layout
from cold_fusion_tf.tensors import safetensors_io as weights
from cold_fusion_tf.errors import UserError


def _settings(**kwargs) -> fusion.Settings:
  return fusion.Settings(workers=2, **kwargs)


def _reference(base: dict, bodies: list[dict], method: str = "mean", counts=None,
               **params) -> dict:
  """Each method applied to whole tensors, straight from fusion_methods."""
  fn = fm.get_method(method)
  return {n: fn(base[n], [b[n] for b in bodies], counts, name=n, **params) for n in base}


def _published_bytes(store, iteration: int = 1) -> bytes:
  with open(os.path.join(store.base_dir(iteration), store_lib.MODEL), "rb") as f:
    return f.read()


def _file_bytes(tensors: dict, path) -> bytes:
  weights.save_safetensors(tensors, str(path))
  with open(path, "rb") as f:
    return f.read()


# ----------------------------------------------------------------------------------------------
# The default fusion: the paper's mean, published byte for byte.


def test_mean_publishes_the_reference_bytes_and_a_provenance_manifest(tmp_path):
  # Prepare
  store = h.new_store(tmp_path)
  base = h.base_tensors(store)
  bodies = [h.nudged(base, i) for i in range(3)]
  for i, body in enumerate(bodies):
    h.contribute(store, f"c{i}", body, num_examples=10 * (i + 1), dataset=f"data{i}")
  logged = []
  # Execute
  outcome = fusion.fuse(store, log=logged.append, settings=_settings())
  # Assert
  assert outcome.published == 1 and store.latest() == 1
  expected = _file_bytes(_reference(base, bodies), tmp_path / "expected.safetensors")
  assert _published_bytes(store) == expected
  manifest = store.manifest(1)
  assert manifest["parent"] == {"iteration": 0, "sha256": store.base_sha256(0)}
  assert manifest["code_version"]
  section = manifest["fusion"]
  assert section["method"] == "mean" and section["params"] == {}
  assert section["rejected"] == [] and section["server_optimizer"] is None
  assert [(e["id"], e["dataset"], e["num_examples"]) for e in section["contributions"]] == [
      ("c0", "data0", 10), ("c1", "data1", 20), ("c2", "data2", 30)]
  for i, entry in enumerate(section["contributions"]):
    assert entry["sha256"] == weights.sha256_file(h.body_path(store, f"c{i}", 0))
    norm = np.sqrt(sum(np.sum((bodies[i][n].astype(np.float64) - base[n]) ** 2) for n in base))
    assert entry["update_norm"] == pytest.approx(norm, rel=1e-5)
    assert entry["dev_metrics"] == {"accuracy": 0.5, "score": 0.5}
  assert set(manifest["files"]) == {"config.json", "model.safetensors", "vocab.txt"}
  assert any(m.startswith("published base 1: mean of 3") for m in logged)


# ----------------------------------------------------------------------------------------------
# Streaming: chunked and threaded results equal the whole-tensor methods, bit for bit.


def _write_bodies(tmp_path, base: dict, bodies: list[dict]):
  paths = []
  for i, tensors in enumerate([base] + bodies):
    paths.append(str(tmp_path / f"t{i}.safetensors"))
    weights.save_safetensors(tensors, paths[-1])
  files = [weights.BodyFile(p) for p in paths]
  return files[0], files[1:]


@pytest.mark.parametrize("method,params", [
    ("mean", {}), ("weighted", {}), ("trimmed_mean", {"trim_fraction": 0.25}), ("median", {}),
    ("task_arithmetic", {"scale": 0.5}), ("ties", {"density": 0.5}),
    ("dare", {"drop_rate": 0.5, "seed": 3})])
def test_streamed_fusion_equals_whole_tensor_methods(tmp_path, monkeypatch, method, params):
  # Prepare: chunks of 7 elements so every tensor is split unevenly; -0.0 and float16 too.
  monkeypatch.setattr(fusion.stream, "CHUNK_ELEMENTS", 7)
  monkeypatch.setattr(fusion.stream, "MEAN_CHUNK_ELEMENTS", 7)
  base, bodies, counts = h.awkward_bodies()
  base_file, files = _write_bodies(tmp_path, base, bodies)
  out = tmp_path / "out.safetensors"
  # Execute
  fusion.fuse_files(base_file, files, counts, base_file.specs(),
                    _settings(method=method, params=params), str(out))
  # Assert
  expected = _file_bytes(_reference(base, bodies, method, counts, **params),
                         tmp_path / "expected.safetensors")
  assert out.read_bytes() == expected
  assert not os.path.exists(str(out) + ".partial")


def test_chunk_writer_refuses_out_of_order_and_short_output(tmp_path):
  # Prepare
  specs = {"a": ((3,), "F32"), "b": ((2,), "F32")}
  writer = weights.ChunkWriter(str(tmp_path / "x.safetensors"), specs)
  # Execute / Assert
  with pytest.raises(ValueError, match="expected a"):
    writer.write("b", np.zeros(2, np.float32))
  writer.write("a", np.zeros(3, np.float32))
  with pytest.raises(ValueError, match="fewer elements"):
    writer.close()
  assert not os.listdir(tmp_path)


# ----------------------------------------------------------------------------------------------
# The validation pass.


def test_scan_hashes_every_byte_and_measures_the_update(tmp_path):
  # Prepare
  base = h.random_body()
  body = h.nudged(base, 1, scale=0.5)
  base_file, (body_file,) = _write_bodies(tmp_path, base, [body])
  specs = base_file.specs()
  # Execute
  result = fusion_io.scan(body_file, specs, base_file, chunk_bytes=64)
  # Assert
  assert result.sha256 == weights.sha256_file(body_file.path)
  expected = sum(np.sum((body[n].astype(np.float64) - base[n]) ** 2) for n in base)
  assert result.squared_distance == pytest.approx(expected, rel=1e-6)
  assert result.nonfinite is None


def test_scan_keeps_huge_finite_values_finite_and_finds_infinities(tmp_path):
  # Prepare: a difference of 6e38 overflows float32 but the values are finite.
  base = {"w": np.full(4, -3e38, np.float32)}
  huge = {"w": np.full(4, 3e38, np.float32)}
  bad = {"w": np.array([0, np.inf, 0, 0], np.float32)}
  base_file, (huge_file, bad_file) = _write_bodies(tmp_path, base, [huge, bad])
  specs = base_file.specs()
  # Execute
  huge_result = fusion_io.scan(huge_file, specs, base_file)
  bad_result = fusion_io.scan(bad_file, specs, base_file)
  # Assert
  assert huge_result.nonfinite is None
  assert huge_result.squared_distance == pytest.approx(4 * 6e38 ** 2, rel=1e-6)
  assert bad_result.nonfinite == "w" and bad_result.squared_distance is None


def test_group_scan_matches_single_scans_and_isolates_a_file_cut_short(tmp_path):
  # Prepare: four bodies, one of them cut short after it was opened, and one written with
  # its tensors in another order (another data layout, so another group).
  base = h.random_body()
  bodies = [h.nudged(base, i, scale=0.1 * (i + 1)) for i in range(4)]
  base_file, files = _write_bodies(tmp_path, base, bodies)
  reordered = str(tmp_path / "reordered.safetensors")
  names = sorted(base, reverse=True)
  with open(reordered, "wb") as f:
    header = json.dumps({n: {"dtype": "F32", "shape": list(bodies[3][n].shape),
                             "data_offsets": [o, o + bodies[3][n].nbytes]}
                         for n, o in zip(names, np.cumsum([0] + [bodies[3][n].nbytes
                                                                 for n in names])[:-1].tolist())})
    f.write(struct.pack("<Q", len(header)) + header.encode())
    for n in names:
      f.write(bodies[3][n].tobytes())
  files[3] = weights.BodyFile(reordered)
  specs = base_file.specs()
  singles = [fusion_io.scan(f, specs, base_file) for f in files]
  os.truncate(files[1].path, os.path.getsize(files[1].path) - 10)
  # Execute
  groups = fusion_io.layout_groups(files, 2)
  results = {}
  for group in groups:
    results.update(zip(group, fusion_io.scan_group([files[i] for i in group], specs, base_file,
                                                   chunk_bytes=256)))
  # Assert: the reordered body is alone in its group; the others share one.
  assert sorted(map(sorted, groups)) == [[0, 1, 2], [3]]
  assert isinstance(results[1], UserError) and "ended early" in str(results[1])
  for i in (0, 2, 3):
    assert results[i].sha256 == singles[i].sha256 == weights.sha256_file(files[i].path)
    expected = sum(np.sum((bodies[i][n].astype(np.float64) - base[n]) ** 2) for n in base)
    assert results[i].squared_distance == pytest.approx(expected, rel=1e-5)


def test_chunk_writer_hashes_what_it_writes(tmp_path):
  # Prepare
  specs = {"a": ((3,), "F32"), "b": ((2, 2), "F16")}
  path = str(tmp_path / "x.safetensors")
  writer = weights.ChunkWriter(path, specs)
  # Execute
  writer.write("a", np.arange(3, dtype=np.float32))
  writer.write("b", np.ones(2, np.float16))
  writer.write("b", np.zeros(2, np.float16))
  writer.close()
  # Assert
  assert writer.sha256 == weights.sha256_file(path)


def test_body_file_rejects_trailing_bytes_and_gaps(tmp_path):
  # Prepare
  path = tmp_path / "a.safetensors"
  weights.save_safetensors({"a": np.ones(2, np.float32), "b": np.ones(2, np.float32)}, str(path))
  data = path.read_bytes()
  (tmp_path / "trailing.safetensors").write_bytes(data + b"\0" * 8)
  (header_len,) = struct.unpack("<Q", data[:8])
  header = json.loads(data[8:8 + header_len])
  header["b"]["data_offsets"] = [12, 20]  # a 4-byte gap before b
  raw = json.dumps(header).encode()
  (tmp_path / "gap.safetensors").write_bytes(
      struct.pack("<Q", len(raw)) + raw + data[8 + header_len:] + b"\0" * 4)
  # Execute / Assert
  with pytest.raises(UserError, match="after the last tensor"):
    weights.BodyFile(str(tmp_path / "trailing.safetensors"))
  with pytest.raises(UserError, match="gap or overlap"):
    weights.BodyFile(str(tmp_path / "gap.safetensors"))


def _overwrite(path, transform) -> None:
  """Rewrites a stored file in place (as a later, unannounced change would)."""
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(transform(data))


def _bad_contributions(store, base):
  """One contribution per kind of defect; returns {id: expected words of the reason}."""
  iteration, base_sha = 0, store.base_sha256(0)
  h.contribute(store, "stale", h.nudged(base, 20), base_sha256="0" * 64)
  h.contribute(store, "changed", h.nudged(base, 21))
  _overwrite(h.body_path(store, "changed"), lambda d: d[:-4] + b"\x00\x00\x80\x3f")
  h.contribute(store, "truncated", h.nudged(base, 22))
  _overwrite(h.body_path(store, "truncated"), lambda d: d[:-100])
  corrupt = os.path.join(store.cache_dir, "corrupt.safetensors")
  with open(corrupt, "wb") as f:
    f.write(b"\xff" * 64)
  store.put_contribution(iteration, "corrupt", corrupt, {
      "base_sha256": base_sha, "dataset": "corrupt", "num_examples": 5, "steps": 1,
      "dev_metrics": {}})
  missing = h.nudged(base, 23)
  missing.pop("pooler.dense.bias")
  h.contribute(store, "missing-tensor", missing)
  wrong_shape = h.nudged(base, 24)
  wrong_shape["pooler.dense.bias"] = np.zeros(h.HIDDEN + 1, np.float32)
  h.contribute(store, "wrong-shape", wrong_shape)
  wrong_dtype = h.nudged(base, 25)
  wrong_dtype["pooler.dense.bias"] = wrong_dtype["pooler.dense.bias"].astype(np.float16)
  h.contribute(store, "wrong-dtype", wrong_dtype)
  nan = h.nudged(base, 26)
  nan["encoder.layer.0.output.dense.weight"][1, 2] = np.nan
  h.contribute(store, "nan", nan)
  h.contribute(store, "scaled", {n: v * 30 for n, v in base.items()})
  h.contribute(store, "sign-flipped", {n: -v for n, v in base.items()})
  folder = store.storage.local_path("contributions/000000/bad-json")
  os.makedirs(folder)
  with open(os.path.join(folder, store_lib.CONTRIBUTION), "w") as f:
    f.write('{"format_version": 1, "base_iteration": "zero"}')
  return {"stale": "stale: trained from base 0", "changed": "does not match the sha256",
          "truncated": "truncated", "corrupt": "not a safetensors file",
          "missing-tensor": "missing ['pooler.dense.bias']",
          "wrong-shape": "tensor pooler.dense.bias is F32[9]",
          "wrong-dtype": "tensor pooler.dense.bias is F16[8]",
          "nan": "encoder.layer.0.output.dense.weight holds NaN",
          "scaled": "is above its bound", "sign-flipped": "is above its bound",
          "bad-json": "field 'base_iteration'"}


def test_every_defect_is_rejected_with_its_reason_and_the_rest_is_fused(tmp_path):
  # Prepare
  store = h.new_store(tmp_path)
  base = h.base_tensors(store)
  honest = [h.nudged(base, i) for i in range(4)]
  for i, body in enumerate(honest):
    h.contribute(store, f"honest{i}", body)
  h.contribute(store, "zz-copycat", honest[0])  # the same bytes as honest0 (kept: first id)
  expected = _bad_contributions(store, base)
  expected["zz-copycat"] = "the same body (sha256"
  logged = []
  # Execute
  outcome = fusion.fuse(store, log=logged.append, settings=_settings())
  # Assert
  assert outcome.published == 1
  section = store.manifest(1)["fusion"]
  assert [e["id"] for e in section["contributions"]] == [f"honest{i}" for i in range(4)]
  reasons = {r["id"]: r["reason"] for r in section["rejected"]}
  assert set(reasons) == set(expected)
  for cid, words in expected.items():
    assert words in reasons[cid], (cid, reasons[cid])
    assert any(m.startswith(f"rejected {cid}: ") for m in logged), cid
  assert [r["id"] for r in section["rejected"]] == sorted(reasons)
  expected_bytes = _file_bytes(_reference(base, honest), tmp_path / "expected.safetensors")
  assert _published_bytes(store) == expected_bytes


def test_outlier_check_needs_three_contributions_and_can_be_turned_off(tmp_path):
  # Prepare
  store = h.new_store(tmp_path, name="two")
  base = h.base_tensors(store)
  h.contribute(store, "a", h.nudged(base, 1))
  h.contribute(store, "big", {n: v * 30 for n, v in base.items()})
  other = h.new_store(tmp_path, name="off")
  for i in range(3):
    h.contribute(other, f"c{i}", h.nudged(base, i))
  h.contribute(other, "big", {n: v * 30 for n, v in base.items()})
  # Execute
  unbounded = {"max_update_ratio": 0, "max_tensor_update_ratio": 0, "max_fused_ratio": 0}
  two = fusion.fuse(store, log=lambda m: None, settings=_settings(**unbounded))
  off = fusion.fuse(other, log=lambda m: None, settings=_settings(max_update_z=0, **unbounded))
  # Assert
  assert [e["id"] for e in two.fused] == ["a", "big"] and two.rejected == []
  assert all(e["update_z"] is None for e in two.fused)
  assert [e["id"] for e in off.fused] == ["big", "c0", "c1", "c2"] and off.rejected == []


def test_too_few_valid_contributions_publish_nothing_and_plan_nothing(tmp_path):
  # Prepare
  store = h.new_store(tmp_path)
  base = h.base_tensors(store)
  h.contribute(store, "a", h.nudged(base, 1))
  nan = h.nudged(base, 2)
  nan["pooler.dense.bias"][0] = np.inf
  h.contribute(store, "b", nan)
  # Execute
  outcome = fusion.fuse(store, log=lambda m: None, settings=_settings(min_contributions=2))
  # Assert
  assert outcome.published is None and not outcome.lost_race
  assert "1 valid contribution(s), fewer than the 2 required" in outcome.message
  assert [r["id"] for r in outcome.rejected] == ["b"]
  assert store.latest() == 0
  assert not store.storage.exists(layout.plan_name(1))
  assert not store.storage.exists("bases/000001")


@pytest.mark.parametrize("flipped", ["data", "header"])
def test_a_corrupt_base_stops_the_fusion_before_anything_is_planned(tmp_path, flipped):
  # Prepare: 3 honest contributions; then one bit of the base's file flipped (same size), in
  # a tensor's data or in its header.
  store = h.new_store(tmp_path)
  base = h.base_tensors(store)
  for i in range(3):
    h.contribute(store, f"c{i}", h.nudged(base, i))
  path = os.path.join(store.base_dir(0), store_lib.MODEL)
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    data[-1 if flipped == "data" else 9] ^= 0x20
    f.seek(0)
    f.write(bytes(data))
  logged = []
  # Execute
  with pytest.raises(UserError, match=r"bases/000000/model\.safetensors: size or sha256 does "
                     "not match the manifest; the base is corrupt"):
    fusion.fuse(store, log=logged.append, settings=_settings())
  # Assert: no plan, no base, no contribution rejected for the base's fault.
  assert store.latest() == 0
  assert not store.storage.exists(layout.plan_name(1))
  assert not store.storage.exists("bases/000001")
  assert not any(m.startswith("rejected") for m in logged)


# ----------------------------------------------------------------------------------------------
# Robust methods against one bad contributor.


@pytest.mark.parametrize("attack", ["scaled", "sign-flipped"])
@pytest.mark.parametrize("method,params", [("median", {}),
                                           ("trimmed_mean", {"trim_fraction": 0.2})])
def test_robust_method_stays_close_to_the_honest_mean(tmp_path, attack, method, params):
  # Prepare: the outlier check is off, so only the method stands between the attacker and
  # the base.
  store = h.new_store(tmp_path)
  base = h.base_tensors(store)
  # Honest contributors move the same way (a shared update) with individual noise.
  shared = h.nudged(base, 99, scale=0.05)
  honest = [h.nudged(shared, i, scale=0.01) for i in range(4)]
  for i, body in enumerate(honest):
    h.contribute(store, f"honest{i}", body)
  factor = 20.0 if attack == "scaled" else -1.0
  h.contribute(store, "attacker", {n: v * factor for n, v in honest[0].items()})
  honest_mean = _reference(base, honest)
  settings = _settings(method=method, params=params, max_update_z=0, max_update_ratio=0,
                       max_tensor_update_ratio=0, min_cosine=-1, max_fused_ratio=0)
  # Execute
  outcome = fusion.fuse(store, log=lambda m: None, settings=settings)
  # Assert
  assert outcome.published == 1 and len(outcome.fused) == 5
  fused = h.base_tensors(store)
  every = honest + [{n: v * factor for n, v in honest[0].items()}]
  plain = _reference(base, every)

  def distance(a):
    return np.sqrt(sum(np.sum((a[n].astype(np.float64) - honest_mean[n]) ** 2) for n in base))

  update = np.sqrt(sum(np.sum((honest_mean[n].astype(np.float64) - base[n]) ** 2)
                       for n in base))
  assert distance(fused) < 0.5 * update  # within half an honest update of the honest mean
  assert distance(plain) > 5 * update    # while the plain mean is dragged far away


# ----------------------------------------------------------------------------------------------
# The server optimizer: state in the store, surviving restarts.


def test_server_optimizer_carries_its_momentum_through_the_store(tmp_path):
  # Prepare
  server = {"lr": 0.7, "momentum": 0.9, "nesterov": True}
  settings = _settings(server_optimizer=server)
  store = h.new_store(tmp_path)
  base0 = h.base_tensors(store)
  first = [h.nudged(base0, i) for i in range(2)]
  for i, body in enumerate(first):
    h.contribute(store, f"a{i}", body)
  # Execute: iteration 0 -> 1, then a fresh Store object (a restarted fuser) for 1 -> 2.
  fusion.fuse(store, log=lambda m: None, settings=settings)
  base1 = h.base_tensors(store)
  second = [h.nudged(base1, 10 + i) for i in range(2)]
  for i, body in enumerate(second):
    h.contribute(store, f"b{i}", body)
  restarted = store_lib.Store(store.uri, cache_dir=store.cache_dir)
  fusion.fuse(restarted, log=lambda m: None, settings=settings)
  # Assert: against two server_momentum_step calls carrying the buffer in memory.
  expected1, expected2, buffers = {}, {}, {}
  for n in base0:
    mean = fm.mean(base0[n], [b[n] for b in first], name=n)
    expected1[n], buffers[n] = server_optimizer.server_momentum_step(
        base0[n], mean.astype(np.float64) - base0[n], None, **server)
  for n in base0:
    mean = fm.mean(base1[n], [b[n] for b in second], name=n)
    expected2[n], buffers[n] = server_optimizer.server_momentum_step(
        base1[n], mean.astype(np.float64) - base1[n], buffers[n], **server)
  for n in base0:
    np.testing.assert_array_equal(base1[n], expected1[n])
  assert _published_bytes(store, 2) == _file_bytes(expected2, tmp_path / "e2.safetensors")
  state = store.manifest(2)["fusion"]["server_optimizer"]
  assert state["previous_state_sha256"] == store.manifest(1)["fusion"]["server_optimizer"][
      "state"]["sha256"]
  path = store.storage.local_path(state["state"]["name"])
  assert state["state"]["name"] == "fusion/000002/momentum.safetensors"
  assert weights.sha256_file(path) == state["state"]["sha256"]
  saved = safetensors.numpy.load_file(path)
  for n in base0:
    np.testing.assert_array_equal(saved[n], buffers[n])


def test_a_tampered_momentum_buffer_stops_the_fusion(tmp_path):
  # Prepare
  settings = _settings(server_optimizer={})
  store = h.new_store(tmp_path)
  base = h.base_tensors(store)
  h.contribute(store, "a", h.nudged(base, 1))
  fusion.fuse(store, log=lambda m: None, settings=settings)
  h.contribute(store, "b", h.nudged(h.base_tensors(store), 2))
  _overwrite(store.storage.local_path(layout.state_name(1)),
             lambda d: d[:-4] + b"\x00\x00\x80\x3f")
  # Execute / Assert
  with pytest.raises(UserError, match="momentum.safetensors: sha256 does not match"):
    fusion.fuse(store, log=lambda m: None, settings=settings)
  assert store.latest() == 1


# ----------------------------------------------------------------------------------------------
# The plan: every attempt at an iteration fuses the same thing.


def test_a_plan_made_with_other_settings_is_refused(tmp_path):
  # Prepare: a fuser planned iteration 1 with median and stopped.
  store = h.new_store(tmp_path)
  base = h.base_tensors(store)
  for i in range(2):
    h.contribute(store, f"c{i}", h.nudged(base, i))
  plan = {"format_version": 1, "iteration": 1,
          "parent": {"iteration": 0, "sha256": store.base_sha256(0)},
          "fusion": {"method": "median", "params": {}, "max_update_z": 3.5,
                     "server_optimizer": None, "contributions": [
                         {"id": "c0", "sha256": "0" * 64}], "rejected": []}}
  store.write_json(layout.plan_name(1), plan)
  # Execute / Assert
  with pytest.raises(UserError, match="planned with other fusion settings"):
    fusion.fuse(store, log=lambda m: None, settings=_settings())
  assert store.latest() == 0
  # A plan with these settings whose contribution is no longer there is planned again.
  plan["fusion"].update(_settings().plan_fields())
  store.write_json(layout.plan_name(1), plan)
  logged = []
  outcome = fusion.fuse(store, log=logged.append, settings=_settings())
  assert outcome.published == 1 and [e["id"] for e in outcome.fused] == ["c0", "c1"]
  assert any("contribution c0 is no longer there as planned" in m and "planning again" in m
             for m in logged)


# ----------------------------------------------------------------------------------------------
# Quorum and waiting (a scripted clock: no real sleeping).


class _Clock:
  """A clock that advances only when the fuser sleeps; ``on_sleep`` runs at each sleep."""

  def __init__(self, on_sleep=None):
    self.now, self.sleeps, self.on_sleep = 0.0, [], on_sleep

  def time(self) -> float:
    return self.now

  def sleep(self, seconds: float) -> None:
    self.sleeps.append(seconds)
    self.now += seconds
    if self.on_sleep:
      self.on_sleep(len(self.sleeps))


def test_waiting_fuser_publishes_once_the_quorum_arrives(tmp_path):
  # Prepare
  store = h.new_store(tmp_path)
  base = h.base_tensors(store)
  h.contribute(store, "early", h.nudged(base, 1))

  def arrive(sleeps):
    if sleeps == 2:
      h.contribute(store, "late", h.nudged(base, 2))

  clock = _Clock(arrive)
  logged = []
  settings = _settings(min_contributions=2, max_wait=100, poll_seconds=10)
  # Execute
  status = fusion.run(store, settings, log=logged.append, sleep=clock.sleep, clock=clock.time)
  # Assert
  assert status == 0 and store.latest() == 1
  assert clock.sleeps == [10, 10]
  assert [e["id"] for e in store.manifest(1)["fusion"]["contributions"]] == ["early", "late"]
  assert any("1 (1 validated) of 2 required contribution(s)" in m for m in logged)


def test_waiting_fuser_validates_each_contribution_once_as_it_arrives(tmp_path, monkeypatch):
  # Prepare: one honest contribution and one with a NaN there from the start, one more
  # honest one arriving at the second poll; every body scan is recorded.
  store = h.new_store(tmp_path)
  base = h.base_tensors(store)
  h.contribute(store, "early", h.nudged(base, 1))
  bad = h.nudged(base, 2)
  bad["encoder.layer.0.output.dense.weight"][0, 0] = np.nan
  h.contribute(store, "bad", bad)
  scanned, real_scan = [], fusion_io.scan_group

  def recording_scan(bodies, *args, **kwargs):
    scanned.append(sorted(os.path.basename(os.path.dirname(b.path)) for b in bodies))
    return real_scan(bodies, *args, **kwargs)

  monkeypatch.setattr(fusion_io, "scan_group", recording_scan)

  def arrive(sleeps):
    if sleeps == 2:
      scanned.append("poll 2")
      h.contribute(store, "late", h.nudged(base, 3))

  clock = _Clock(arrive)
  logged = []
  settings = fusion.Settings(min_contributions=2, max_wait=100, poll_seconds=10, workers=1)
  # Execute
  status = fusion.run(store, settings, log=logged.append, sleep=clock.sleep, clock=clock.time)
  # Assert: early and bad were read before the wait, late when it arrived, none again.
  assert status == 0 and store.latest() == 1
  assert scanned == [["bad", "early"], "poll 2", ["late"]]
  assert [e["id"] for e in store.manifest(1)["fusion"]["contributions"]] == ["early", "late"]
  assert [r["id"] for r in store.manifest(1)["fusion"]["rejected"]] == ["bad"]
  rejected_at = next(i for i, m in enumerate(logged) if m.startswith("rejected bad"))
  assert rejected_at < next(i for i, m in enumerate(logged) if "checking every" in m)
  assert sum(m.startswith("rejected bad") for m in logged) == 1


def test_deadline_without_quorum_publishes_nothing(tmp_path):
  # Prepare
  store = h.new_store(tmp_path)
  h.contribute(store, "only", h.nudged(h.base_tensors(store), 1))
  clock = _Clock()
  logged = []
  settings = _settings(min_contributions=2, max_wait=25, poll_seconds=10)
  # Execute
  status = fusion.run(store, settings, log=logged.append, sleep=clock.sleep, clock=clock.time)
  # Assert
  assert status == 1 and store.latest() == 0
  assert clock.sleeps == [10, 10, 5]
  assert "waited 25s for contributions to iteration 0: 1 there, 2 required; nothing " \
         "published." in logged


def test_watch_fuses_iteration_after_iteration(tmp_path):
  # Prepare
  store = h.new_store(tmp_path)

  def contribute_to_latest(sleeps):
    latest = store.latest()
    cid = f"it{latest}-c{sleeps}"
    h.contribute(store, cid, h.nudged(h.base_tensors(store), sleeps))

  clock = _Clock(contribute_to_latest)
  settings = _settings(min_contributions=2, poll_seconds=5, watch_iterations=2)
  # Execute
  status = fusion.run(store, settings, watch=True, log=lambda m: None, sleep=clock.sleep,
                      clock=clock.time)
  # Assert
  assert status == 0 and store.latest() == 2
  for iteration in (1, 2):
    assert len(store.manifest(iteration)["fusion"]["contributions"]) == 2


def test_settings_reject_bad_values():
  # Execute / Assert
  with pytest.raises(UserError, match="min_contributions=0"):
    fusion.Settings(min_contributions=0)
  with pytest.raises(UserError, match="max_wait=-1"):
    fusion.Settings(max_wait=-1)
  with pytest.raises(UserError, match="Unknown fusion method 'avg'"):
    fusion.Settings(method="avg")
  with pytest.raises(UserError, match="lr=0"):
    fusion.Settings(server_optimizer={"lr": 0})


def test_settings_from_the_default_config():
  # Prepare
  from cold_fusion_tf.configs import defaults  # pylint: disable=g-import-not-at-top
  config = defaults.get_config()
  # Execute
  plain = fusion.Settings.from_config(config.fusion)
  config.fusion.server_optimizer.enabled = True
  config.fusion.max_update_z = 5
  server = fusion.Settings.from_config(config.fusion)
  # Assert
  assert plain.method == "mean" and plain.server_optimizer is None
  assert plain.max_update_z == 3.5 and plain.min_contributions == 1
  assert server.server_optimizer == {"lr": 0.7, "momentum": 0.9, "nesterov": True}
  assert server.max_update_z == 5.0


# ----------------------------------------------------------------------------------------------
# A store in Google Cloud Storage (the fake-gcs-server emulator).


def test_fusion_on_a_gcs_store_with_server_state(tmp_path, gcs_emulator):
  # Prepare
  bucket = gcs_emulator.make_bucket()
  local = h.new_store(tmp_path, name="local")
  base = h.base_tensors(local)
  settings = _settings(server_optimizer={})
  store = store_lib.Store(f"gs://{bucket}/run", cache_dir=str(tmp_path / "gcs-cache"))
  store.create(local.base_dir(0), {"source_model": "synthetic"})
  for iteration in range(2):
    current = h.base_tensors(store)
    for i in range(3):
      h.contribute(store, f"c{i}", h.nudged(current, 10 * iteration + i))
      h.contribute(local, f"c{i}", h.nudged(current, 10 * iteration + i))
    # Execute
    fusion.fuse(store, log=lambda m: None, settings=settings)
    fusion.fuse(local, log=lambda m: None, settings=settings)
  # Assert: the same bytes as the same fusion on a local store.
  assert store.latest() == 2 and base is not None
  for iteration in (1, 2):
    assert store.manifest(iteration)["files"] == local.manifest(iteration)["files"]
    assert (store.storage.read_bytes(layout.state_name(iteration))
            == local.storage.read_bytes(layout.state_name(iteration)))
