"""Metrics and report helpers against hand-computed values."""

import math

import numpy as np

from cold_fusion_tf.training import metrics
from cold_fusion_tf.evaluation import report


def test_rankdata_averages_ties():
  assert metrics.rankdata(np.array([10, 20, 20, 5])).tolist() == [2.0, 3.5, 3.5, 1.0]


def test_spearman_and_pearson_known_values():
  x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
  assert metrics.spearman(x, x ** 3) == 1.0
  assert metrics.spearman(x, -x) == -1.0
  # d = rank differences (0, 0, 1, -1, 0): rho = 1 - 6 * 2 / (5 * 24) = 0.9
  assert math.isclose(metrics.spearman(x, np.array([1, 2, 4, 3, 5])), 0.9)
  assert math.isclose(metrics.pearson([1, 2, 3], [2, 4, 7]), 0.9933992677987828)


def test_task_metrics_score_is_accuracy_or_spearman():
  logits = np.array([[2.0, 0.1], [0.0, 1.0], [3.0, -1.0]])
  assert metrics.task_metrics("classification", np.array([0, 1, 1]), logits)["score"] == 2 / 3
  reg = metrics.task_metrics("regression", np.array([0.1, 0.5, 0.9]), np.array([[1], [2], [3]]))
  assert reg["score"] == reg["spearman"] == 1.0


def test_report_rows_gains_and_markdown():
  evaluations = {
      0: {"scores": {"a": {"score": 0.5}, "b": {"score": 0.7}, "c": {"score": 0.6}},
          "contributors": []},
      1: {"scores": {"a": {"score": 0.6}, "b": {"score": 0.8}, "c": {"score": 0.65}},
          "contributors": ["a", "b"]},
  }
  table = report.rows(evaluations, ["a", "b"], ["c"])
  assert math.isclose(table[1]["held_in"], 0.7) and math.isclose(table[1]["held_in_gain"], 0.1)
  assert math.isclose(table[1]["held_out_gain"], 0.05)
  text = report.markdown(table, ["a", "b"], ["c"])
  assert "| 1 | 70.0 | +10.0 | 65.0 | +5.0 | 60.0 | 80.0 | 65.0 | a, b |" in text
  assert report.summary(table) == ("Fused base 1 vs the original base: held-in 70.0 (+10.0 "
                                   "points), held-out 65.0 (+5.0 points).")
  unscored = report.rows({0: {"scores": {}, "contributors": []},
                          1: {"scores": {}, "contributors": ["a"]}}, ["a", "b"], ["c"])
  assert report.summary(unscored).startswith("No base has been scored (eval.enabled is off)")
  assert report.to_csv(table, ["a", "b"], ["c"]).splitlines()[0] == (
      "iteration,held_in,held_in_gain,held_out,held_out_gain,a,b,c,contributors")
