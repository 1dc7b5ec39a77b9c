"""The whole loop on tiny real models and real data: the store layout, exact means, reports."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from cold_fusion_tf.simulation import loop
from cold_fusion_tf import store as store_lib
from cold_fusion_tf.tensors import safetensors_io as weights
from tests import tiny

HEAD_MARKERS = ("head", "classifier", "out_proj")


@pytest.fixture(scope="module", params=["bert", "roberta"])
def finished_store(request, tmp_path_factory):
  # Prepare: a tiny encoder of each family and a store driven by the real loop.
  family = request.param
  root = tmp_path_factory.mktemp(f"e2e_{family}")
  source = tiny.write_tiny_base(str(root / "source"), family)
  config = tiny.tiny_config(source, **({"eval.enabled": False} if family == "roberta" else {}))
  lines = []
  # Execute
  table = loop.run(config, str(root / "store"), log=lines.append)
  return family, str(root / "store"), config, table, lines


def _sha(path):
  return weights.sha256_file(path)


def test_layout_latest_and_manifests(finished_store):
  _, root, _, _, _ = finished_store
  # Assert: bases 0..2, LATEST = 2, every manifest hash matches its file.
  assert sorted(os.listdir(os.path.join(root, "bases"))) == ["000000", "000001", "000002"]
  assert open(os.path.join(root, "LATEST")).read().strip() == "2"
  for iteration in range(3):
    base = os.path.join(root, "bases", f"{iteration:06d}")
    manifest = json.load(open(os.path.join(base, "manifest.json")))
    assert manifest["iteration"] == iteration
    listed = set(manifest["files"])
    assert listed == set(os.listdir(base)) - {"manifest.json"}
    assert {"config.json", "model.safetensors"} <= listed
    for name, info in manifest["files"].items():
      assert info["sha256"] == _sha(os.path.join(base, name))
      assert info["size"] == os.path.getsize(os.path.join(base, name))
    if iteration:
      parent = json.load(open(os.path.join(root, "bases", f"{iteration - 1:06d}", "manifest.json")))
      assert manifest["parent"] == {"iteration": iteration - 1,
                                    "sha256": parent["files"]["model.safetensors"]["sha256"]}
      assert len(manifest["fusion"]["contributions"]) == 2
      assert manifest["fusion"]["method"] == "mean"


def test_contributions_have_their_json(finished_store):
  _, root, _, _, _ = finished_store
  for iteration in (0, 1):
    folder = os.path.join(root, "contributions", f"{iteration:06d}")
    ids = sorted(os.listdir(folder))
    assert ids == ["sst2", "trec_coarse"]
    base_sha = _sha(os.path.join(root, "bases", f"{iteration:06d}", "model.safetensors"))
    for cid in ids:
      meta = json.load(open(os.path.join(folder, cid, "contribution.json")))
      assert meta["base_iteration"] == iteration
      assert meta["base_sha256"] == base_sha
      assert meta["body_sha256"] == _sha(os.path.join(folder, cid, "body.safetensors"))
      assert meta["num_examples"] == 48 and meta["steps"] == 3
      assert 0.0 <= meta["dev_metrics"]["score"] <= 1.0


def test_base_one_is_the_exact_mean_of_iteration_zero(finished_store):
  _, root, _, _, _ = finished_store
  bodies = [load_file(os.path.join(root, "contributions", "000000", cid, "body.safetensors"))
            for cid in ("sst2", "trec_coarse")]
  fused = load_file(os.path.join(root, "bases", "000001", "model.safetensors"))
  base0 = load_file(os.path.join(root, "bases", "000000", "model.safetensors"))
  assert set(fused) == set(base0) == set(bodies[0]) == set(bodies[1])
  changed = 0
  for name, value in fused.items():
    expected = ((bodies[0][name].astype(np.float64) + bodies[1][name].astype(np.float64)) / 2
                ).astype(np.float32)
    np.testing.assert_array_equal(value, expected, err_msg=name)
    changed += int(not np.array_equal(value, base0[name]))
  assert changed > len(fused) // 2  # training really moved the body


def test_no_head_tensor_in_any_base_or_body(finished_store):
  _, root, _, _, _ = finished_store
  for dirpath, _, files in os.walk(root):
    for name in files:
      if name.endswith(".safetensors"):
        keys = load_file(os.path.join(dirpath, name)).keys()
        assert not [k for k in keys if any(m in k for m in HEAD_MARKERS)], (dirpath, name)


def test_report_compares_fused_and_original(finished_store):
  family, root, _, table, lines = finished_store
  if family == "roberta":  # evaluation disabled: the report still lists every base
    assert [r["iteration"] for r in table] == [0, 1, 2]
    assert os.path.exists(os.path.join(root, "report.md"))
    return
  assert [r["iteration"] for r in table] == [0, 1, 2]
  report = open(os.path.join(root, "report.md")).read()
  assert "| 0 (original base) |" in report and "| 2 |" in report
  assert "held-in" in report and "held-out" in report and "rte (held out)" in report
  assert "Fused base 2 vs the original base" in report
  with open(os.path.join(root, "report.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  csv_rows = open(os.path.join(root, "report.csv")).read().splitlines()
  assert csv_rows[0].startswith("iteration,held_in,held_in_gain,held_out,held_out_gain")
  assert len(csv_rows) == 4
  for iteration in range(3):
    saved = json.load(open(os.path.join(root, "evaluations", f"{iteration:06d}.json")))
    assert set(saved["scores"]) == {"sst2", "trec_coarse", "rte"}
    assert all(0.0 <= v["score"] <= 1.0 for v in saved["scores"].values())
  assert table[0]["held_in_gain"] == 0.0


def test_store_reads_back_as_a_valid_store(finished_store):
  _, root, _, _, _ = finished_store
  store = store_lib.Store(root)
  assert store.require_latest() == 2
  assert store.base_dir(2) == os.path.join(root, "bases", "000002")
  found, rejected = store.contributions(1)
  assert [c.contributor_id for c in found] == ["sst2", "trec_coarse"] and rejected == []


def test_rerun_resumes_without_training_again(finished_store):
  family, root, config, _, _ = finished_store
  before = {n: os.path.getmtime(os.path.join(root, "bases", n, "model.safetensors"))
            for n in ("000001", "000002")}
  lines = []
  loop.run(config, root, log=lines.append)
  assert not [l for l in lines if "training" in l]
  after = {n: os.path.getmtime(os.path.join(root, "bases", n, "model.safetensors"))
           for n in before}
  assert before == after
  # One more iteration continues from LATEST = 2.
  if family == "bert":
    config.unlock()
    config.iterations = 3
    config.eval.enabled = False
    lines = []
    loop.run(config, root, log=lines.append)
    assert open(os.path.join(root, "LATEST")).read().strip() == "3"
    assert any("=== iteration 2" in l for l in lines)
    assert not any("=== iteration 1" in l for l in lines)
