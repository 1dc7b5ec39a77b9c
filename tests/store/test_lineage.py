"""``python -m cold_fusion_tf.inspect``: the lineage of a store, from its JSON files only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

import synthetic as h
from cold_fusion_tf import fusion
from cold_fusion_tf.store import lineage as inspect_store

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _store_with_history(tmp_path):
  """Base 0, base 1 (two fused, one rejected), evaluations, and an open iteration 1."""
  store = h.new_store(tmp_path)
  base = h.base_tensors(store)
  h.contribute(store, "alice", h.nudged(base, 1), dataset="sst2", num_examples=1200, score=0.81)
  h.contribute(store, "bob", h.nudged(base, 2), dataset="rte", num_examples=300, score=0.62)
  broken = h.nudged(base, 3)
  broken["pooler.dense.bias"][0] = np.nan
  h.contribute(store, "carol", broken, dataset="trec")
  fusion.fuse(store, log=lambda m: None, settings=fusion.Settings(workers=1))
  for iteration, score in ((0, 0.70), (1, 0.74)):
    store.write_json(f"evaluations/{iteration:06d}.json", {
        "iteration": iteration, "contributors": [],
        "scores": {"sst2": {"score": score, "std": 0.01, "scores": [score - 0.01, score + 0.01]},
                   "bad\x1b[31mtask": {"score": 0.5, "std": 0.0, "scores": [0.5]}}})
  h.contribute(store, "dave", h.nudged(h.base_tensors(store), 4), dataset="ag_news")
  return store


def test_lineage_lists_bases_contributors_rejections_and_scores(tmp_path):
  # Prepare
  store = _store_with_history(tmp_path)
  # Execute
  text = inspect_store.format_lineage(inspect_store.lineage(store))
  # Assert
  lines = text.splitlines()
  assert lines[0] == f"store {store.uri}: bert from synthetic, LATEST = 1"
  base1 = next(line for line in lines if line.startswith("base 1 "))
  assert f"sha256 {store.base_sha256(1)[:12]}" in base1
  assert f"parent 0 ({store.base_sha256(0)[:12]})" in base1 and "method mean" in base1
  alice = next(line for line in lines if line.strip().startswith("alice"))
  assert "dataset sst2" in alice and "1200 examples" in alice
  assert "dev accuracy=0.81 score=0.81" in alice and "update " in alice
  carol = next(line for line in lines if line.strip().startswith("carol"))
  assert "tensor pooler.dense.bias holds NaN or infinite values" in carol
  assert "  rejected (1):" in lines
  assert sum(line.strip().startswith("sst2") for line in lines) == 2
  assert any(line.strip().startswith("sst2") and "0.7400 +- 0.0100 (2 runs)" in line
             for line in lines)
  assert "\x1b" not in text and "bad?[31mtask" in text
  assert "iteration 1 (open): 1 contribution(s) so far" in text
  assert any(line.strip().startswith("dave") and "dataset ag_news" in line for line in lines)


def test_lineage_reports_a_broken_store_instead_of_failing(tmp_path):
  # Prepare: LATEST points past the last complete base.
  store = _store_with_history(tmp_path)
  store.storage.write_bytes("LATEST", b"2\n")
  # Execute
  text = inspect_store.format_lineage(inspect_store.lineage(store))
  # Assert
  assert "base 2\n  PROBLEM: " in text and "missing; base 2 is not complete" in text


def test_a_latest_far_beyond_the_bases_costs_one_line(tmp_path):
  # Prepare: LATEST names a base nearly a million past the last one.
  store = _store_with_history(tmp_path)
  store.storage.write_bytes("LATEST", b"999999\n")
  # Execute
  data = inspect_store.lineage(store)
  text = inspect_store.format_lineage(data)
  # Assert: the bases that exist, then the missing one with its problem; nothing in between.
  assert [row["iteration"] for row in data["bases"]] == [0, 1, 999999]
  assert data["bases"][-1]["problems"] and not data["bases"][1]["problems"]
  assert len(text.splitlines()) < 60


def test_the_program_prints_text_and_json(tmp_path):
  # Prepare
  store = _store_with_history(tmp_path)
  env = dict(os.environ, HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="2")
  command = [sys.executable, "-m", "cold_fusion_tf.inspect", f"--store={store.uri}"]
  # Execute
  text = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=60, check=False)
  as_json = subprocess.run(command + ["--json"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=60, check=False)
  missing = subprocess.run([sys.executable, "-m", "cold_fusion_tf.inspect",
                            f"--store={tmp_path / 'nothing'}"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=60, check=False)
  # Assert
  assert text.returncode == 0, text.stderr
  assert text.stdout.strip() == inspect_store.format_lineage(inspect_store.lineage(store))
  data = json.loads(as_json.stdout)
  assert [b["iteration"] for b in data["bases"]] == [0, 1]
  assert [e["id"] for e in data["bases"][1]["fused"]] == ["alice", "bob"]
  assert missing.returncode == 2 and "is not a ColD Fusion store" in missing.stderr
