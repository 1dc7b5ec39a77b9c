"""The fusion made before the plan (fusion.speculative): kept only when the plan fuses exactly
those bodies, as planned byte for byte; a body that fails a check after it was fused early
never reaches the published base. Tiny synthetic stores."""

from __future__ import annotations

import os

import numpy as np
import pytest

import synthetic as h
from cold_fusion_tf import fusion
from cold_fusion_tf import store as store_lib
from cold_fusion_tf.fusion import methods as fm
from cold_fusion_tf.fusion import speculative
from cold_fusion_tf.store import layout
from cold_fusion_tf.tensors import safetensors_io as weights


def _settings(**kwargs) -> fusion.Settings:
  return fusion.Settings(workers=2, **kwargs)


def _expected_bytes(base: dict, bodies: list[dict], path, method="mean", counts=None) -> bytes:
  """The file of ``method`` applied to whole tensors, straight from fusion.methods."""
  fn = fm.get_method(method)
  weights.save_safetensors({n: fn(base[n], [b[n] for b in bodies], counts, name=n)
                            for n in base}, str(path))
  with open(path, "rb") as f:
    return f.read()


def _published_bytes(store, iteration: int = 1) -> bytes:
  with open(os.path.join(store.base_dir(iteration), store_lib.MODEL), "rb") as f:
    return f.read()


@pytest.mark.parametrize("method", ["mean", "weighted", "trimmed_mean"])
def test_valid_bodies_are_fused_while_validated_as_the_planned_fusion_writes_them(tmp_path,
                                                                                   method):
  # Prepare: 4 honest bodies (the direction check runs), different claims of examples.
  store = h.new_store(tmp_path)
  base = h.base_tensors(store)
  bodies = [h.nudged(base, i) for i in range(4)]
  claims = [10, 20, 30, 40]
  for i, body in enumerate(bodies):
    h.contribute(store, f"c{i}", body, num_examples=claims[i])
  # Execute
  outcome = fusion.fuse(store, log=lambda m: None, settings=_settings(method=method))
  # Assert: the fusion made on the way is the published base, the method's bytes exactly.
  assert outcome.published == 1 and outcome.timings["fused_before_plan"] == 1.0
  assert [e["id"] for e in outcome.fused] == ["c0", "c1", "c2", "c3"]
  expected = _expected_bytes(base, bodies, tmp_path / "expected.safetensors", method,
                             np.asarray(claims, dtype=np.float64))
  assert _published_bytes(store) == expected
  assert store.manifest(1)["files"][store_lib.MODEL]["sha256"] == weights.sha256_file(
      os.path.join(store.base_dir(1), store_lib.MODEL))


@pytest.mark.parametrize("count", [2, 3])
def test_a_body_failing_only_its_sha256_is_fused_early_but_never_published(tmp_path, count):
  # Prepare: honest bodies and one changed after upload by a finite, small value in its
  # last element (within every bound: only its sha256 tells). With 3 honest ones the
  # direction check fuses them again early; with 2 there is no direction check.
  store = h.new_store(tmp_path)
  base = h.base_tensors(store)
  honest = [h.nudged(base, i) for i in range(count)]
  for i, body in enumerate(honest):
    h.contribute(store, f"honest{i}", body)
  h.contribute(store, "changed", h.nudged(base, 9))
  path = h.body_path(store, "changed")
  with open(path, "r+b") as f:
    f.seek(-4, os.SEEK_END)
    last = np.frombuffer(f.read(4), np.float32)[0]
    f.seek(-4, os.SEEK_END)
    f.write(np.float32(last + 0.001).tobytes())
  logged = []
  # Execute
  outcome = fusion.fuse(store, log=logged.append, settings=_settings())
  # Assert: rejected for its sha256 and reported; the base is the mean of the others only.
  assert outcome.published == 1
  assert outcome.timings["fused_before_plan"] == float(count == 3)
  assert [e["id"] for e in outcome.fused] == [f"honest{i}" for i in range(count)]
  assert [r["id"] for r in outcome.rejected] == ["changed"]
  assert "does not match the sha256" in outcome.rejected[0]["reason"]
  assert any(m.startswith("rejected changed: ") for m in logged)
  assert _published_bytes(store) == _expected_bytes(base, honest, tmp_path / "mean.safetensors")
  assert [r["id"] for r in store.manifest(1)["fusion"]["rejected"]] == ["changed"]


def test_a_waiting_fuser_fuses_while_checking_directions_and_a_rerun_writes_the_same_bytes(
    tmp_path):
  # Prepare: 3 honest bodies validated as they arrived; a second store with the same bodies.
  stores = [h.new_store(tmp_path, name=name) for name in ("waiting", "rerun")]
  base = h.base_tensors(stores[0])
  bodies = [h.nudged(base, i) for i in range(3)]
  for store in stores:
    for i, body in enumerate(bodies):
      h.contribute(store, f"c{i}", body)
  settings = _settings()
  validations = fusion.Validations(stores[0], settings, lambda m: None)
  assert validations.refresh() == 3
  # Execute: the waiting fuser at its quorum; on the other store, a fuser that follows the
  # plan the first one made.
  try:
    waited = fusion.fuse(stores[0], log=lambda m: None, settings=settings,
                         validations=validations)
  finally:
    validations.close()
  stores[1].write_plan(1, stores[0].read_json(layout.plan_name(1)))
  rerun = fusion.fuse(stores[1], log=lambda m: None, settings=settings)
  # Assert
  assert waited.published == 1 and waited.timings["fused_before_plan"] == 1.0
  assert rerun.published == 1 and rerun.timings["fused_before_plan"] == 1.0
  expected = _expected_bytes(base, bodies, tmp_path / "mean.safetensors")
  assert _published_bytes(stores[0]) == expected == _published_bytes(stores[1])


def test_the_pass_measures_each_update_as_the_validation_scan_does(tmp_path):
  # Prepare: a base and 3 bodies, one with an infinity.
  from cold_fusion_tf.tensors import streaming  # pylint: disable=g-import-not-at-top
  base = h.random_body()
  bodies = [h.nudged(base, i, scale=0.1) for i in range(3)]
  bodies[2]["pooler.dense.bias"][3] = np.inf
  paths = []
  for i, tensors in enumerate([base] + bodies):
    paths.append(str(tmp_path / f"{i}.safetensors"))
    weights.save_safetensors(tensors, paths[-1])
  files = [weights.BodyFile(p) for p in paths]
  specs = files[0].specs()
  try:
    # Execute
    _, _, updates, terms = speculative.fuse_measured(
        files[0], files[1:3], None, specs, _settings(), str(tmp_path / "out.safetensors"),
        directions=True)
    _, _, with_inf, _ = speculative.fuse_measured(
        files[0], files[1:], None, specs, _settings(), str(tmp_path / "inf.safetensors"),
        directions=False)
    scans = streaming.scan_group(files[1:], specs, files[0])
    expected_terms = streaming.direction_terms(files[1:3], specs, files[0])
  finally:
    for f in files:
      f.close()
  # Assert: the same norms per tensor and in all, bit for bit; the same first non-finite
  # tensor; direction terms as the direction check computes them.
  for update, scan in zip(with_inf, scans):
    result = update.scan(scan.sha256)
    assert (result.squared_distance, result.nonfinite, result.tensors) == (
        scan.squared_distance, scan.nonfinite, scan.tensors)
  assert with_inf[2].nonfinite == "pooler.dense.bias"
  assert [u.total for u in updates] == [s.squared_distance for s in scans[:2]]
  for got, want in zip(terms, expected_terms):
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("scenario", ["honest", "clipped", "against"])
def test_the_early_fusion_publishes_what_the_plain_fusion_publishes(tmp_path, monkeypatch,
                                                                   scenario):
  # Prepare: the same contributions in two stores: 3 honest updates sharing a direction, and
  # one clipped onto the norm bound, or one against the others (rejected by the direction
  # check after the early fusion included it).
  stores = [h.new_store(tmp_path, name=name) for name in ("early", "plain")]
  base = h.base_tensors(stores[0])
  shared = h.nudged(base, 99, scale=0.02)
  bodies = {f"c{i}": h.nudged(shared, i) for i in range(3)}
  if scenario == "clipped":
    bodies["big"] = {n: (v + 10.0).astype(np.float32) for n, v in base.items()}
  if scenario == "against":
    bodies["against"] = {n: (base[n] - 2 * (shared[n] - base[n])).astype(np.float32)
                         for n in base}
  for store in stores:
    for i, (cid, body) in enumerate(sorted(bodies.items())):
      h.contribute(store, cid, body, num_examples=10 * (i + 1))
  settings = _settings(method="weighted", clip_updates=True, max_update_z=0)
  # Execute: with the early fusion, then without it (direction check and fusion as planned).
  early = fusion.fuse(stores[0], log=lambda m: None, settings=settings)
  monkeypatch.setattr(speculative, "possible", lambda *args: False)
  plain = fusion.fuse(stores[1], log=lambda m: None, settings=settings)
  # Assert: the same plan, the same bytes.
  assert early.published == plain.published == 1
  assert early.timings["fused_before_plan"] == float(scenario != "against")
  assert plain.timings["fused_before_plan"] == 0.0
  assert early.fused == plain.fused
  assert [r["id"] for r in early.rejected] == [r["id"] for r in plain.rejected] == (
      ["against"] if scenario == "against" else [])
  if scenario == "clipped":
    assert "clip" in next(e for e in early.fused if e["id"] == "big")
  assert _published_bytes(stores[0]) == _published_bytes(stores[1])


@pytest.mark.parametrize("method,params", [
    ("mean", {}), ("weighted", {}), ("trimmed_mean", {"trim_fraction": 0.25}), ("median", {}),
    ("task_arithmetic", {"scale": 0.5})])
def test_the_measured_pass_writes_each_element_wise_method_bit_for_bit(tmp_path, monkeypatch,
                                                                      method, params):
  # Prepare: chunks of 28 bytes so every tensor is split unevenly; -0.0 and float16 too.
  from cold_fusion_tf.tensors import streaming  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(streaming, "SCAN_CHUNK_BYTES", 28)
  base, bodies, counts = h.awkward_bodies()
  paths = [str(tmp_path / f"{i}.safetensors") for i in range(len(bodies) + 1)]
  for path, tensors in zip(paths, [base] + bodies):
    weights.save_safetensors(tensors, path)
  files = [weights.BodyFile(path) for path in paths]
  out = tmp_path / "out.safetensors"
  # Execute
  try:
    speculative.fuse_measured(files[0], files[1:], counts, files[0].specs(),
                              _settings(method=method, params=params), str(out), True)
  finally:
    for f in files:
      f.close()
  # Assert
  fn = fm.get_method(method)
  weights.save_safetensors({n: fn(base[n], [b[n] for b in bodies], counts, name=n, **params)
                            for n in base}, str(tmp_path / "expected"))
  assert out.read_bytes() == (tmp_path / "expected").read_bytes()
