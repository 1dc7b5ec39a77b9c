"""The whole loop on tiny real models and real data: the store layout, exact means, reports."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from cold_fusion_tf.errors import UserError
from cold_fusion_tf.simulation import loop
from cold_fusion_tf import store as store_lib
from cold_fusion_tf.tensors import safetensors_io as weights
import tiny

HEAD_MARKERS = ("head", "classifier", "out_proj")


@pytest.fixture(scope="module", params=["bert", "roberta"])
def finished_store(request, tmp_path_factory):
  # Prepare: a tiny encoder of each family and a store driven by the real loop.
  family = request.param
  root = tmp_path_factory.mktemp(f"e2e_{family}")
  source = tiny.write_tiny_base(str(root / "source"), family)
  # The plain mean, as the demo fuses (a server step below 1 is the server optimizer's, tested
  # there).
  overrides = {"fusion.server_optimizer.enabled": False}
  if family == "roberta":
    overrides["eval.enabled"] = False
  else:
    overrides.update({"eval.seeds": 2, "eval.every": 0, "eval.tasks": "all"})
  config = tiny.demo_config(source, **overrides)
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
  # Prepare
  _, root, _, _, _ = finished_store
  # Assert
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
  # Prepare
  _, root, _, _, _ = finished_store
  bodies = [load_file(os.path.join(root, "contributions", "000000", cid, "body.safetensors"))
            for cid in ("sst2", "trec_coarse")]
  fused = load_file(os.path.join(root, "bases", "000001", "model.safetensors"))
  base0 = load_file(os.path.join(root, "bases", "000000", "model.safetensors"))
  # Assert
  assert set(fused) == set(base0) == set(bodies[0]) == set(bodies[1])
  changed = 0
  for name, value in fused.items():
    expected = ((bodies[0][name].astype(np.float64) + bodies[1][name].astype(np.float64)) / 2
                ).astype(np.float32)
    np.testing.assert_array_equal(value, expected, err_msg=name)
    changed += int(not np.array_equal(value, base0[name]))
  assert changed > len(fused) // 2  # training really moved the body


def test_no_head_tensor_in_any_base_or_body(finished_store):
  # Prepare
  _, root, _, _, _ = finished_store
  # Assert
  for dirpath, _, files in os.walk(root):
    for name in files:
      if name.endswith(".safetensors"):
        keys = load_file(os.path.join(dirpath, name)).keys()
        assert not [k for k in keys if any(m in k for m in HEAD_MARKERS)], (dirpath, name)


def test_report_compares_fused_and_original(finished_store):
  # Prepare
  family, root, _, summary, lines = finished_store
  report = open(os.path.join(root, "report.md")).read()
  # Assert
  if family == "roberta":  # evaluation disabled: the report says so
    assert "No base has been scored (eval.enabled is off)" in report
    assert [m["name"] for m in summary["models"]] == ["base 0"]
    return
  # Bases 0 and 2 (eval.every=0: the original and the last) were scored on 3 tasks x 2 seeds
  # through the evaluate program's pipeline.
  assert [m["name"] for m in summary["models"]] == ["base 0", "base 2"]
  assert not os.path.exists(os.path.join(root, "evaluations", "000001.json"))
  assert summary["groups"] == {"all tasks": ["sst2", "trec_coarse", "rte"],
                               "held-in": ["sst2", "trec_coarse"], "held-out": ["rte"]}
  for iteration in (0, 2):
    saved = json.load(open(os.path.join(root, "evaluations", f"{iteration:06d}.json")))
    sha = _sha(os.path.join(root, "bases", f"{iteration:06d}", "model.safetensors"))
    assert saved["base_sha256"] == sha and len(saved["runs"]) == 6
    assert {(r["task"], r["seed"]) for r in saved["runs"]} == {
        (t, s) for t in ("sst2", "trec_coarse", "rte") for s in (0, 1)}
    assert all(r["model"] == sha and r["mode"] == "finetune" for r in saved["runs"])
    assert len({r["recipe_key"] for r in saved["runs"]}) == 1
    for task, value in saved["scores"].items():
      runs = sorted((r["seed"], r["score"]) for r in saved["runs"] if r["task"] == task)
      assert value["scores"] == [score for _, score in runs]
      assert value["score"] == pytest.approx(np.mean(value["scores"]))
  # The report: scores per base, the newest base's paired gains with standard errors.
  assert "| base 0 (reference) |" in report and "| base 2 |" in report
  assert "| base 1 |" not in report
  assert "## The newest base against the original" in report
  assert "| rte | held-out |" in report and "- held-out: " in report
  gain = summary["gains"]["base 2"]["tasks"]["rte"]
  scores = summary["scores"]
  assert gain["mean"] == pytest.approx(scores["base 2"]["tasks"]["rte"]["mean"]
                                       - scores["base 0"]["tasks"]["rte"]["mean"])
  assert gain["n"] == 2 and gain["se"] >= 0
  with open(os.path.join(root, "report.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  csv_rows = open(os.path.join(root, "report.csv")).read().splitlines()
  assert csv_rows[0].startswith("model,task,mean,std,n,gain,gain_se")
  assert len(csv_rows) == 1 + 2 * (3 + 3)  # 2 bases x (3 tasks + 3 group means)
  assert sum("6 runs (1 model(s) x 3 task(s) x 2 seed(s)" in l for l in lines) == 2


def test_store_reads_back_as_a_valid_store(finished_store):
  # Prepare
  _, root, _, _, _ = finished_store
  store = store_lib.Store(root)
  # Execute / Assert
  assert store.require_latest() == 2
  assert store.base_dir(2) == os.path.join(root, "bases", "000002")
  found, rejected = store.contributions(1)
  assert [c.contributor_id for c in found] == ["sst2", "trec_coarse"] and rejected == []


def test_rerun_resumes_without_training_again(finished_store):
  # Prepare
  family, root, config, _, _ = finished_store
  before = {n: os.path.getmtime(os.path.join(root, "bases", n, "model.safetensors"))
            for n in ("000001", "000002")}
  # Execute: a rerun
  lines = []
  loop.run(config, root, log=lines.append)
  # Assert
  assert not [l for l in lines if l.startswith("[")]  # no contributor, no fine-tune
  if family == "bert":  # every evaluation run is reused
    assert sum("6 already in" in l and "0 to run" in l for l in lines) == 2
  after = {n: os.path.getmtime(os.path.join(root, "bases", n, "model.safetensors"))
           for n in before}
  assert before == after
  # Execute / Assert
  # One more seed: only the new seed's runs are done, for the evaluated bases 0 and 2.
  if family == "bert":
    config.unlock()
    config.eval.seeds = 3
    lines = []
    summary = loop.run(config, root, log=lines.append)
    assert sum("9 runs (1 model(s)" in l and "6 already in" in l and "3 to run" in l
               for l in lines) == 2
    assert summary["gains"]["base 2"]["groups"]["held-in"]["n_seeds"] == 3
  # Execute / Assert
  # One more iteration continues from LATEST = 2.
  if family == "bert":
    config.iterations = 3
    config.eval.enabled = False
    lines = []
    loop.run(config, root, log=lines.append)
    assert open(os.path.join(root, "LATEST")).read().strip() == "3"
    assert any("=== iteration 2" in l for l in lines)
    assert not any("=== iteration 1" in l for l in lines)


def test_tensorboard_scalars_of_every_base(finished_store):
  from cold_fusion_tf.simulation import scalars  # pylint: disable=g-import-not-at-top
  family, root, _, _, _ = finished_store
  latest = int(open(os.path.join(root, "LATEST")).read())  # 3 after the rerun test's iteration
  # Assert: in the local store's tensorboard folder, one point per published base and scalar.
  points = scalars.RunScalars(os.path.join(root, scalars.DIRECTORY)).read()
  fused = set(range(1, latest + 1))
  assert points["fusion/contributions_fused"] == {i: 2.0 for i in fused}
  assert points["fusion/contributions_rejected"] == {i: 0.0 for i in fused}
  assert set(points["fusion/update_norm_mean"]) == fused == set(points["fusion/seconds"])
  assert all(v > 0 for v in points["fusion/seconds"].values())
  assert os.path.exists(os.path.join(root, scalars.DIRECTORY, scalars.EVENTS))
  if family == "bert":  # evaluated: base 0 and base 2, the last one while eval was on
    assert set(points["eval/sst2"]) == {0, 2} and set(points["eval/rte"]) == {0, 2}
    assert all(0 <= v <= 100 for v in points["eval/held-out"].values())
  else:
    assert not [tag for tag in points if tag.startswith("eval/")]


@pytest.mark.parametrize("overrides,message", [
    ({"contributors_per_iteration": 3}, r"contributors_per_iteration=3 exceeds the pool of 2 "
                                        r"datasets"),
    ({"heldout": ("rte", os.path.join(tiny.DATA, "sst2"))},
     r"dataset\(s\) sst2 both in config.pool and in config.heldout"),
])
def test_a_loop_it_cannot_run_is_refused_before_any_work(tmp_path, overrides, message):
  # Prepare: a source that is never read (the config is refused first)
  config = tiny.demo_config(str(tmp_path / "no_source"), **overrides)
  # Execute / Assert
  with pytest.raises(UserError, match=message):
    loop.run(config, str(tmp_path / "store"), log=lambda _: None)
  assert os.listdir(tmp_path) == []
