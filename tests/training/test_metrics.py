"""Metrics and report helpers against hand-computed values."""

import math

import numpy as np

from cold_fusion_tf.training import metrics
from cold_fusion_tf.evaluation import report
from cold_fusion_tf.evaluation import summary


def test_rankdata_averages_ties():
  # Execute / Assert
  assert metrics.rankdata(np.array([10, 20, 20, 5])).tolist() == [2.0, 3.5, 3.5, 1.0]


def test_spearman_and_pearson_known_values():
  # Prepare
  x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
  # Execute / Assert
  assert metrics.spearman(x, x ** 3) == 1.0
  assert metrics.spearman(x, -x) == -1.0
  # d = rank differences (0, 0, 1, -1, 0): rho = 1 - 6 * 2 / (5 * 24) = 0.9
  assert math.isclose(metrics.spearman(x, np.array([1, 2, 4, 3, 5])), 0.9)
  assert math.isclose(metrics.pearson([1, 2, 3], [2, 4, 7]), 0.9933992677987828)


def test_task_metrics_score_is_accuracy_or_spearman():
  # Prepare
  logits = np.array([[2.0, 0.1], [0.0, 1.0], [3.0, -1.0]])
  # Execute / Assert
  assert metrics.task_metrics("classification", np.array([0, 1, 1]), logits)["score"] == 2 / 3
  reg = metrics.task_metrics("regression", np.array([0.1, 0.5, 0.9]), np.array([[1], [2], [3]]))
  assert reg["score"] == reg["spearman"] == 1.0


def _diffs(gains, spread=0.004, seeds=3):
  """{task: {seed: difference}}: each task's gain, varied over seeds by -spread, 0, +spread."""
  return {t: {s: g + spread * (s - 1) for s in range(seeds)} for t, g in gains.items()}


def test_group_gain_has_standard_errors_over_seeds_and_over_tasks():
  # Prepare: three tasks, three seeds.
  diffs = {"a": {0: 0.04, 1: 0.06, 2: 0.05}, "b": {0: 0.02, 1: 0.00, 2: 0.04},
           "c": {0: -0.02, 1: -0.03, 2: -0.025}}
  # Execute
  group = summary.group_gain(diffs)
  # Assert: the mean of the task gains; SE over the per-seed means and over the task gains.
  per_task = [0.05, 0.02, -0.025]
  per_seed = [np.mean([0.04, 0.02, -0.02]), np.mean([0.06, 0.0, -0.03]),
              np.mean([0.05, 0.04, -0.025])]
  assert math.isclose(group["mean"], np.mean(per_task))
  assert math.isclose(group["se_seeds"], np.std(per_seed, ddof=1) / math.sqrt(3))
  assert math.isclose(group["se_tasks"], np.std(per_task, ddof=1) / math.sqrt(3))
  assert group["se"] == max(group["se_seeds"], group["se_tasks"])
  assert group["n_tasks"] == 3 and group["n_seeds"] == 3
  # c loses 2.5 points with a standard error of 0.29: flagged.
  assert group["losses"] == ["c"] and summary.task_gain(diffs["c"])["loss"]
  assert group["verdict"] == "unclear"


def test_verdict_needs_a_mean_above_two_standard_errors_and_no_flagged_loss():
  # Prepare: four tasks gaining 5 points; then the same with a fifth losing half a point.
  gaining = {t: 0.05 for t in "abcd"}
  # Execute
  clean = summary.group_gain(_diffs(gaining))
  with_loss = summary.group_gain(_diffs({**gaining, "e": -0.005}, spread=0.0005))
  one_seed = summary.group_gain(_diffs(gaining, seeds=1))
  losing = summary.group_gain(_diffs({t: -0.05 for t in "abcd"}))
  # Assert
  assert clean["verdict"] == "gain" and clean["losses"] == []
  assert with_loss["mean"] > 2 * with_loss["se"]  # the mean alone would pass...
  assert with_loss["losses"] == ["e"] and with_loss["verdict"] == "unclear"  # ...the loss not
  assert one_seed["verdict"] == "illustration" and math.isnan(one_seed["se"])
  assert losing["verdict"] == "loss"


def test_gain_lines_flag_losses_and_say_one_seed_is_an_illustration():
  # Prepare: a summary of one base against a reference, as summarize builds it.
  def scores(values):
    return {"mean": float(np.mean(values)), "std": 0.0, "n": len(values), "scores": {}}
  diffs = _diffs({"a": 0.05, "b": -0.03})
  gains = {"tasks": {t: summary.task_gain(d) for t, d in diffs.items()},
           "groups": {"held-out": summary.group_gain(diffs)}}
  table = {"mode": "finetune", "seeds": [0, 1, 2], "reference": "base 0",
           "tasks": ["a", "b"], "groups": {"held-out": ["a", "b"]},
           "models": [{"name": "base 0"}, {"name": "base 2"}],
           "scores": {"base 0": {"tasks": {"a": scores([0.5]), "b": scores([0.6])},
                                 "groups": {"held-out": 0.55}},
                      "base 2": {"tasks": {"a": scores([0.55]), "b": scores([0.57])},
                                 "groups": {"held-out": 0.56}}},
           "gains": {"base 2": gains}}
  # Execute
  text = report.markdown(table)
  one_seed = report.markdown({**table, "seeds": [0]})
  rows = report.to_csv(table).splitlines()
  # Assert
  assert "| b | held-out | 60.0 | 57.0 | -3.00 ± 0.23 | -13.0 | 3 | **LOSS** |" in text
  assert "| a | held-out | 50.0 | 55.0 | +5.00 ± 0.23 | +21.7 | 3 |  |" in text
  assert ("- held-out: +1.00 ± 4.00 points over 2 task(s) and 3 seed(s): not shown to help"
          in text)
  assert "flagged losses: b (-3.00 ± 0.23)" in text
  assert "One seed: an illustration, not a finding" in one_seed
  assert "One seed" not in text
  assert rows[0] == ("model,task,mean,std,n,gain,gain_se,gain_se_seeds,gain_se_tasks,z,flag,"
                     "constant")
  assert rows[5].startswith("base 2,b,0.57,0,1,-0.03,0.0023094,,,-13.0,loss")
  assert rows[6].endswith(",unclear,")
