"""Evaluation metrics as pure numpy functions: accuracy, Pearson and Spearman correlation."""

from __future__ import annotations

import numpy as np

from cold_fusion_tf.errors import UserError


def accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
  """Share of exact matches between class ids."""
  labels, predictions = np.asarray(labels), np.asarray(predictions)
  if labels.size == 0:
    return float("nan")
  return float(np.mean(labels == predictions))


def rankdata(values: np.ndarray) -> np.ndarray:
  """Ranks starting at 1, ties get the mean of their ranks (like scipy's 'average')."""
  values = np.asarray(values, dtype=np.float64)
  order = np.argsort(values, kind="mergesort")
  sorted_values = values[order]
  ranks = np.empty(len(values), dtype=np.float64)
  start = 0
  while start < len(values):
    end = start
    while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
      end += 1
    ranks[order[start:end + 1]] = (start + end) / 2.0 + 1.0
    start = end + 1
  return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  x, y = x - x.mean(), y - y.mean()
  denom = np.sqrt((x * x).sum() * (y * y).sum())
  return float((x * y).sum() / denom) if denom > 0 else 0.0


def spearman(x: np.ndarray, y: np.ndarray) -> float:
  """Spearman rank correlation (the metric for STS-B-like regression tasks)."""
  return pearson(rankdata(x), rankdata(y))


def task_metrics(kind: str, labels: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
  """The metrics of a task from model outputs (logits, or scores for regression).

  ``score`` is the headline number: accuracy for classification, Spearman for regression.
  Outputs that are not all finite (a fine-tune that diverged) have no score: a UserError.
  """
  if not np.all(np.isfinite(outputs)):
    raise UserError(f"the model's outputs are not finite ({int(np.sum(~np.isfinite(outputs)))} "
                    "of them): the fine-tune diverged; lower the recipe's learning_rate.")
  if kind == "regression":
    scores = outputs.reshape(-1)
    rho = spearman(labels, scores)
    return {"score": rho, "spearman": rho, "pearson": pearson(labels, scores)}
  acc = accuracy(labels, outputs.argmax(-1))
  return {"score": acc, "accuracy": acc}
