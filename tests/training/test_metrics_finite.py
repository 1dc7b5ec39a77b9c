"""A fine-tune whose outputs are not finite has no score: one error, not a NaN in the results
(which the results file refuses with a traceback) or an accuracy from NaN logits."""

import numpy as np
import pytest

from cold_fusion_tf.errors import UserError
from cold_fusion_tf.training import metrics


@pytest.mark.parametrize("kind,outputs", [
    ("regression", np.array([[0.1], [np.nan], [0.3]], np.float32)),
    ("classification", np.array([[0.1, 0.2], [np.inf, 0.0], [0.3, -np.inf]], np.float32)),
])
def test_outputs_that_are_not_finite_are_one_error(kind, outputs):
  # Prepare
  labels = np.array([0, 1, 1])
  # Execute / Assert
  with pytest.raises(UserError, match=r"the model's outputs are not finite \((1|2) of them\): "
                                      r"the fine-tune diverged; lower the recipe's learning_rate"):
    metrics.task_metrics(kind, labels, outputs)


def test_finite_outputs_are_scored():
  # Execute
  scores = metrics.task_metrics("regression", np.array([1.0, 2.0, 3.0]),
                                np.array([[0.5], [0.1], [0.9]], np.float32))
  classes = metrics.task_metrics("classification", np.array([0, 1, 1]),
                                 np.array([[2.0, 1.0], [0.0, 1.0], [3.0, 0.0]], np.float32))
  # Assert
  assert scores["score"] == pytest.approx(0.5) and scores["spearman"] == pytest.approx(0.5)
  assert classes == {"score": pytest.approx(2 / 3), "accuracy": pytest.approx(2 / 3)}
