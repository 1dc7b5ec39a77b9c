"""TensorBoard scalars of a run: one point per (scalar, base), readable by TensorBoard; a
point scored again is replaced, not doubled; the fuse program writes its fusion's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import synthetic as h
from cold_fusion_tf.simulation import scalars
import tiny

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tensorboard(logdir) -> dict:
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  accumulator = event_accumulator.EventAccumulator(str(logdir))
  accumulator.Reload()
  return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
          for tag in accumulator.Tags()["scalars"]}


def test_points_append_and_a_changed_point_replaces(tmp_path):
  # Execute: two writers, as two runs of a program would be.
  first = scalars.RunScalars(str(tmp_path))
  first.add(0, {"eval/sst2": 50.0, "eval/held-out": float("nan")})
  first.add(1, {"eval/sst2": 55.0, "fusion/seconds": 2.5})
  again = scalars.RunScalars(str(tmp_path))
  again.add(1, {"eval/sst2": 56.0})
  again.add(2, {"eval/sst2": 60.0})
  # Assert
  assert again.read() == {"eval/sst2": {0: 50.0, 1: 56.0, 2: 60.0}, "fusion/seconds": {1: 2.5}}
  assert _tensorboard(tmp_path) == {"eval/sst2": [(0, 50.0), (1, 56.0), (2, 60.0)],
                                    "fusion/seconds": [(1, 2.5)]}


def test_where_scalars_go(tmp_path):
  # Execute / Assert
  assert scalars.open_for(str(tmp_path / "store")).logdir == str(tmp_path / "store" /
                                                                  "tensorboard")
  assert scalars.open_for("gs://bucket/run") is None
  assert scalars.open_for("gs://bucket/run", str(tmp_path)).logdir == str(tmp_path)


@pytest.mark.parametrize("logdir", [False, True])
def test_the_fuse_program_writes_its_fusion(tmp_path, logdir):
  # Prepare: two honest contributions and one with a NaN (rejected).
  store = h.new_store(tmp_path)
  base = h.base_tensors(store)
  for i in range(2):
    h.contribute(store, f"c{i}", h.nudged(base, i))
  broken = h.nudged(base, 9)
  broken["pooler.dense.weight"][0, 0] = float("nan")
  h.contribute(store, "broken", broken)
  where = tmp_path / "logs" if logdir else tmp_path / "store" / "tensorboard"
  # Execute
  result = subprocess.run([sys.executable, "-m", "cold_fusion_tf.fuse", "--config=demo",
                           f"--store={store.uri}"] + ([f"--logdir={where}"] if logdir else []),
                          cwd=REPO, env=tiny.env(), capture_output=True, text=True,
                          timeout=300)
  # Assert
  assert result.returncode == 0, result.stderr[-3000:]
  points = _tensorboard(where)
  assert points["fusion/contributions_fused"] == [(1, 2.0)]
  assert points["fusion/contributions_rejected"] == [(1, 1.0)]
  assert points["fusion/update_norm_max"][0][1] >= points["fusion/update_norm_mean"][0][1] > 0
  assert points["fusion/seconds"][0][1] > 0


def test_a_waiting_fuser_records_the_fusion_time_not_the_wait(tmp_path):
  # Prepare: a fuser that needs two contributions; the second arrives after WAIT seconds.
  import threading  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  from cold_fusion_tf import fusion  # pylint: disable=g-import-not-at-top
  wait = 3.0
  store = h.new_store(tmp_path)
  base = h.base_tensors(store)
  h.contribute(store, "c0", h.nudged(base, 0))
  late = threading.Timer(wait, lambda: h.contribute(store, "c1", h.nudged(base, 1)))
  settings = fusion.Settings(min_contributions=2, max_wait=120.0, poll_seconds=0.2, workers=1)
  logdir = str(tmp_path / "logs")
  # Execute
  started = time.monotonic()
  late.start()
  status = fusion.run(store, settings, log=lambda message: None,
                      published=scalars.fuser_recorder(store, logdir))
  elapsed = time.monotonic() - started
  late.join()
  # Assert
  assert status == 0 and store.latest() == 1
  assert elapsed >= wait
  seconds = scalars.RunScalars(logdir).read()["fusion/seconds"]
  assert list(seconds) == [1]
  assert 0 < seconds[1] < wait
  gcs_store = type("GCSStore", (), {"uri": "gs://bucket/run"})()
  assert scalars.fuser_recorder(gcs_store, None) is None


def test_rejections_a_plan_counts_without_listing_them_are_counted(tmp_path):
  # Prepare: a manifest's fusion section that lists 2 rejections and counts 3 more; a
  # section whose count is not a number.
  class Manifests:  # what RunScalars.fusion reads of a store
    def __init__(self, sections):
      self.sections = sections

    def manifest(self, iteration):
      return {"fusion": self.sections[iteration]}

  listed = [{"id": "x", "reason": "r"}, {"id": "y", "reason": "r"}]
  store = Manifests({1: {"contributions": [], "rejected": listed, "rejected_not_listed": 3},
                     2: {"contributions": [], "rejected": listed, "rejected_not_listed": "3"}})
  writer = scalars.RunScalars(str(tmp_path))
  # Execute
  writer.fusion(store, 1)
  writer.fusion(store, 2)
  # Assert
  assert writer.read()["fusion/contributions_rejected"] == {1: 5.0, 2: 2.0}


def test_evaluation_points_follow_the_report_after_a_rerun(tmp_path):
  # Prepare: base 0 and base 2 scored on sst2 and rte, with a fusion point of base 2.
  def summary(tasks, groups, models=("base 0", "base 2")):
    return {"scores": {m: {"tasks": {t: {"mean": v} for t, v in tasks.items()},
                           "groups": groups} for m in models}}
  first = scalars.RunScalars(str(tmp_path))
  first.add(2, {"fusion/contributions_fused": 2.0})
  first.evaluation(summary({"sst2": 50.0, "rte": 60.0}, {"held-in": 50.0, "held-out": 60.0}),
                   {"base 0": 0, "base 2": 2})
  # Execute: a rerun that evaluates rte only (eval.tasks=heldout), and scores base 2 no more
  # (its runs were made with another recipe).
  again = scalars.RunScalars(str(tmp_path))
  again.evaluation(summary({"rte": 61.0}, {"held-out": 61.0}, models=("base 0",)),
                   {"base 0": 0, "base 1": 1, "base 2": 2})
  # Assert: the points are the new report's, in points.json and in the event file alike.
  expected = {"eval/rte": {0: 61.0}, "eval/held-out": {0: 61.0},
              "fusion/contributions_fused": {2: 2.0}}
  assert scalars.RunScalars(str(tmp_path)).read() == expected
  assert _tensorboard(tmp_path) == {tag: sorted(points.items())
                                    for tag, points in expected.items()}
