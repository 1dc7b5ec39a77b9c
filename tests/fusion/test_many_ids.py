"""The fuser against many ids: however many contributions a store lists, the base it publishes
stays readable and its memory bounded; a minority of ids cannot get an honest update rejected
by the direction check. Tiny synthetic stores."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import synthetic as h
from cold_fusion_tf import fusion
from cold_fusion_tf import store as store_lib
from cold_fusion_tf.errors import UserError
from cold_fusion_tf.fusion import plan as plan_lib
from cold_fusion_tf.fusion import trust
from cold_fusion_tf.store import layout
from cold_fusion_tf.store import lineage

FOLDER = "contributions/000000"


def _settings(**kwargs) -> fusion.Settings:
  return fusion.Settings(workers=2, **kwargs)


def _junk(store, count: int) -> None:
  """``count`` ids whose contribution.json is refused (each rejection a long reason)."""
  folder = store.storage.local_path(FOLDER)
  for i in range(count):
    cid = f"junk{i:06d}" + "x" * 110
    os.makedirs(os.path.join(folder, cid))
    with open(os.path.join(folder, cid, store_lib.CONTRIBUTION), "w") as f:
      f.write('{"dataset": "' + "d" * 110 + '", "x": ' + "[" * 40 + "]" * 40 + "}")


def test_thousands_of_refused_ids_leave_a_readable_base(tmp_path):
  # Prepare: 2 honest contributions and 12,000 refused ids: listed in full, their rejections
  # would make a manifest larger than any program reads (every later program would fail).
  store = h.new_store(tmp_path)
  base = h.base_tensors(store)
  bodies = [h.nudged(base, i) for i in range(2)]
  for i, body in enumerate(bodies):
    h.contribute(store, f"honest{i}", body)
  _junk(store, 12_000)
  # Execute
  outcome = fusion.fuse(store, log=lambda m: None, settings=_settings())
  # Assert: published; the manifest and the plan are readable, list what fits and count the
  # rest; a second fusion (of base 1) runs; inspect shows the count.
  assert outcome.published == 1 and len(outcome.rejected) == 12_000
  size = os.path.getsize(store.storage.local_path(f"bases/000001/{store_lib.MANIFEST}"))
  assert size <= layout.MAX_JSON_BYTES
  section = store_lib.Store(store.uri, cache_dir=store.cache_dir).manifest(1)["fusion"]
  listed = len(section["rejected"])
  assert 0 < listed < 12_000 and listed + section["rejected_not_listed"] == 12_000
  assert [r["id"] for r in section["rejected"]] == sorted(r["id"] for r in
                                                          outcome.rejected)[:listed]
  assert store.read_json(layout.plan_name(1))["fusion"]["rejected_not_listed"] == 12_000 - listed
  h.contribute(store, "next", h.nudged(h.base_tensors(store), 5))
  assert fusion.fuse(store, log=lambda m: None, settings=_settings()).published == 2
  text = lineage.format_lineage(lineage.lineage(store))
  assert "rejected (12000):" in text and f"and {12_000 - listed} more, not listed" in text


def test_a_plan_too_large_leaves_out_dev_metrics_then_refuses(monkeypatch):
  # Prepare: a plan of 3 fused contributions with dev metrics and 2 rejections.
  def plan(metrics):
    entries = [{"id": f"c{i}", "dataset": "d", "num_examples": 1, "sha256": "0" * 64,
                "dev_metrics": metrics, "update_norm": 1.0, "update_z": None}
               for i in range(3)]
    return {"format_version": 1, "iteration": 1, "parent": {"iteration": 0, "sha256": "0" * 64},
            "fusion": {"contributions": entries,
                       "rejected": [{"id": f"r{i}", "reason": "x" * 500} for i in range(2)]}}

  small = plan({"score": 0.5})
  large = plan({f"metric{i:02d}": 0.5 for i in range(32)})
  # Execute
  monkeypatch.setattr(plan_lib, "MAX_PLAN_BYTES", len(layout.json_bytes(small)) - 1)
  without_rejections = plan_lib.fit(small)
  without_metrics = plan_lib.fit(large)
  monkeypatch.setattr(plan_lib, "MAX_PLAN_BYTES", 200)
  # Assert
  assert without_rejections["fusion"]["rejected"] == [{"id": "r0", "reason": "x" * 500}]
  assert without_rejections["fusion"]["rejected_not_listed"] == 1
  assert without_rejections["fusion"]["contributions"] == small["fusion"]["contributions"]
  assert without_metrics["fusion"]["rejected"] == []
  assert all(e["dev_metrics"] == {} for e in without_metrics["fusion"]["contributions"])
  assert plan_lib.sameentry(large["fusion"]["contributions"][0],
                            without_metrics["fusion"]["contributions"][0])
  with pytest.raises(UserError, match="3 contributions to fuse make a plan of .* nothing was "
                     "planned or published"):
    plan_lib.fit(small)


def test_a_contribution_json_of_huge_arrays_is_refused_before_it_is_parsed(tmp_path):
  # Prepare: contribution.json files of 4 MiB of empty arrays (90 MB of Python objects each,
  # all held at once by a fuser) or nested past what the schema needs, and an honest one.
  store = h.new_store(tmp_path)
  h.contribute(store, "honest", h.nudged(h.base_tensors(store), 1))
  meta = {"format_version": 1, "base_iteration": 0, "base_sha256": store.base_sha256(0),
          "body_sha256": "0" * 64, "dataset": "d", "num_examples": 10, "steps": 1,
          "dev_metrics": {}}
  arrays = json.dumps({**meta, "contributor_id": "arrays"})[:-1] + ', "x": [' + ",".join(
      ["[]"] * 1_390_000) + "]}"
  nested = {**meta, "contributor_id": "nested", "x": [[[1]]]}
  for cid, text in (("arrays", arrays), ("nested", json.dumps(nested))):
    store.storage.write_bytes(f"{FOLDER}/{cid}/{store_lib.CONTRIBUTION}", text.encode())
  # Execute
  found, unreadable = store.contributions(0)
  # Assert
  assert [c.contributor_id for c in found] == ["honest"]
  reasons = {r["id"]: r["reason"] for r in unreadable}
  assert "more than the 16384 allowed" in reasons["arrays"]
  assert "nested 4 deep (at most 3)" in reasons["nested"]


def test_a_contributor_cannot_write_a_contribution_json_the_fuser_refuses(tmp_path):
  # Prepare
  store = h.new_store(tmp_path)
  path = os.path.join(str(tmp_path), "body.safetensors")
  from cold_fusion_tf.tensors import safetensors_io  # pylint: disable=g-import-not-at-top
  safetensors_io.save_safetensors(h.nudged(h.base_tensors(store), 1), path)
  metrics = {f"m{i:02d}-" + "x" * 300: 0.5 for i in range(60)}
  # Execute / Assert
  with pytest.raises(UserError, match="more than the 16384 a fuser reads"):
    store.put_contribution(0, "chatty", path, {
        "base_sha256": store.base_sha256(0), "dataset": "d", "num_examples": 5, "steps": 1,
        "dev_metrics": metrics})
  assert not store.storage.exists(f"{FOLDER}/chatty")


@pytest.mark.parametrize("honest_count, against_count", [(3, 1), (3, 2), (2, 2), (4, 3)])
def test_a_minority_sending_the_opposite_of_an_honest_update_cannot_get_it_rejected(
    tmp_path, honest_count, against_count):
  # Prepare: honest updates nearly orthogonal to each other (fine-tunes on different tasks);
  # a minority of ids (up to half) send minus honest0's update, each with its own noise,
  # within the norm and outlier checks.
  store = h.new_store(tmp_path)
  base = h.base_tensors(store)
  honest = [h.nudged(base, i) for i in range(honest_count)]
  for i, body in enumerate(honest):
    h.contribute(store, f"honest{i}", body)
  for k in range(against_count):
    noise = h.nudged(base, 50 + k, scale=0.002)
    h.contribute(store, f"against{k}", {n: (noise[n] - (honest[0][n] - base[n])).astype(
        np.float32) for n in base})
  # Execute
  outcome = fusion.fuse(store, log=lambda m: None, settings=_settings())
  # Assert: no honest update is rejected (the opposite updates steer within the bounds).
  assert not any(r["id"].startswith("honest") for r in outcome.rejected), outcome.rejected
  assert {f"honest{i}" for i in range(honest_count)} <= {e["id"] for e in outcome.fused}


def test_robust_cosines_leave_out_the_updates_most_opposed():
  # Prepare: x, its opposite y, z orthogonal to both, and w = x + z.
  updates = np.array([[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0], [1.0, 1.0, 0]])
  gram = updates @ updates.T
  # Execute
  plain, robust = trust.robust_cosines(gram, [0, 1, 2, 3])
  # Assert: each against the others' sum, then with up to 2 of them left out, those most
  # opposed first: x leaves out y, then z (x . w = 1/sqrt(2) of their norms); y leaves out x,
  # then w, and is orthogonal to z.
  for i in range(4):
    others = updates[[j for j in range(4) if j != i]].sum(axis=0)
    expected = updates[i] @ others / np.linalg.norm(updates[i]) / np.linalg.norm(others)
    assert plain[i] == pytest.approx(expected)
  assert plain[1] == pytest.approx(-np.sqrt(0.5)) and plain[0] == pytest.approx(0.0)
  assert robust[0] == pytest.approx(np.sqrt(0.5)) and robust[1] == pytest.approx(0.0)
