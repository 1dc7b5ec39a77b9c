"""Withdrawing bases: ``python -m cold_fusion_tf.rollback`` moves LATEST back by compare-and-swap
and records who and why; the next fusion goes on from there under a new number; work for a
withdrawn base is stale. Tiny synthetic stores."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import synthetic as h
from cold_fusion_tf import fusion
from cold_fusion_tf import store as store_lib
from cold_fusion_tf.errors import UserError
from cold_fusion_tf.store import layout
from cold_fusion_tf.store import lineage
from cold_fusion_tf.store import rollbacks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _settings() -> fusion.Settings:
  return fusion.Settings(workers=1)


def _store_at(tmp_path, latest: int) -> store_lib.Store:
  """A store whose LATEST is ``latest``, each base fused from two contributions."""
  store = h.new_store(tmp_path)
  for iteration in range(latest):
    base = h.base_tensors(store)
    for i in range(2):
      h.contribute(store, f"c{i}", h.nudged(base, 10 * iteration + i))
    assert fusion.fuse(store, log=lambda m: None, settings=_settings()).published == iteration + 1
  return store


def _program(tmp_path, store, *flags) -> subprocess.CompletedProcess:
  env = dict(os.environ, TMPDIR=str(tmp_path), COLD_FUSION_CACHE=str(tmp_path / "cache"))
  return subprocess.run([sys.executable, "-m", "cold_fusion_tf.rollback", f"--store={store.uri}",
                         *flags], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=120, check=False)


def test_rollback_program_moves_latest_back_and_records_who_and_why(tmp_path):
  # Prepare
  store = _store_at(tmp_path, 2)
  # Execute
  result = _program(tmp_path, store, "--to=0", "--reason=base 1 and 2 diverged")
  # Assert
  assert result.returncode == 0, result.stderr
  assert "LATEST moved back from base 2 to base 0; withdrawn: 1, 2" in result.stdout
  assert store.latest() == 0
  record = store.read_json(layout.rollback_name(2))
  assert record["from"] == 2 and record["to"] == 0 and record["withdrawn"] == [1, 2]
  assert record["reason"] == "base 1 and 2 diverged" and "@" in record["by"] and record["time"]
  text = lineage.format_lineage(lineage.lineage(store))
  assert "rollback from base 2 to base 0 by" in text and "base 1 and 2 diverged" in text


def test_the_next_fusion_continues_from_the_rolled_back_base_and_stale_work_is_rejected(
    tmp_path):
  # Prepare: LATEST 2, a contribution already made for base 2, then a rollback to base 1.
  store = _store_at(tmp_path, 2)
  base1, base2 = h.base_tensors(store, 1), h.base_tensors(store, 2)
  h.contribute(store, "for-base-2", h.nudged(base2, 7))
  rollbacks.rollback(store, 1, "base 2 is bad", by="owner")
  # A contributor that trained on base 2 but uploads next to base 1's contributions.
  h.contribute(store, "late", h.nudged(base2, 8), iteration=1,
               base_sha256=store.base_sha256(2))
  h.contribute(store, "fresh", h.nudged(base1, 9))
  # Execute
  outcome = fusion.fuse(store, log=lambda m: None, settings=_settings())
  # Assert: base 3 (never a rewrite of base 2), parent 1, from base 1's contributions.
  assert outcome.published == 3 and store.latest() == 3
  manifest = store.manifest(3)
  assert manifest["parent"] == {"iteration": 1, "sha256": store.base_sha256(1)}
  assert sorted(e["id"] for e in outcome.fused) == ["c0", "c1", "fresh"]
  late = {r["id"]: r["reason"] for r in outcome.rejected}["late"]
  assert late.startswith("stale: trained from base 1 (" + store.base_sha256(2)[:12])
  assert store.manifest(2)["iteration"] == 2  # the withdrawn base is still there, unchanged
  rows = lineage.lineage(store)["bases"]
  assert [r["iteration"] for r in rows] == [0, 1, 3] and not any(r["problems"] for r in rows)
  assert store.next_iteration(3) == 4


def test_rollback_refuses_what_it_cannot_do(tmp_path):
  # Prepare
  store = _store_at(tmp_path, 1)
  # Execute / Assert
  with pytest.raises(UserError, match="--reason is required"):
    rollbacks.rollback(store, 0, "  ")
  with pytest.raises(UserError, match="--to=1: not an earlier base of LATEST"):
    rollbacks.rollback(store, 1, "why")
  with pytest.raises(UserError, match="--to=5: not an earlier base"):
    rollbacks.rollback(store, 5, "why")
  bad = _program(tmp_path, store, "--reason=x")
  assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == (
      "error: --to is required: the base to go back to.")
  assert store.latest() == 1 and not store.storage.exists(layout.rollback_name(1))


def test_a_rollback_that_loses_the_race_changes_nothing(tmp_path):
  # Prepare: a fuser publishes base 2 between the rollback's reading of LATEST and its swap.
  store = _store_at(tmp_path, 1)
  base = h.base_tensors(store)
  for i in range(2):
    h.contribute(store, f"n{i}", h.nudged(base, 40 + i))
  swap = store.storage.compare_and_swap

  def fuser_first(name, data, token):
    store.storage.compare_and_swap = swap
    fusion.fuse(store_lib.Store(store.uri, cache_dir=store.cache_dir), log=lambda m: None,
                settings=_settings())
    return swap(name, data, token)

  store.storage.compare_and_swap = fuser_first
  # Execute / Assert
  with pytest.raises(UserError, match="LATEST moved while rolling back; nothing changed"):
    rollbacks.rollback(store, 0, "too late")
  assert store.latest() == 2
  assert not store.storage.exists(layout.rollback_name(1))
  assert store.next_iteration(2) == 3
