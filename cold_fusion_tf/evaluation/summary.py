"""Model-recycling numbers: scores over seeds, paired gains with standard errors, flagged
losses and a verdict (the tables and charts are drawn by :mod:`.report`).

Scores are a task's test metric (accuracy; Spearman for regression), as mean and standard
deviation over seeds. Every model is fine-tuned with the same seeds (the same head
initialisation and data order), so a base's gain over the reference is measured by paired
differences ``d[task, seed] = base - reference``:

* a task's gain: the mean of its differences, with standard error std(d, ddof=1) / sqrt(n);
  the task is a *flagged loss* when its gain is below minus two standard errors;
* a group's gain (held-in, held-out, all tasks): the unweighted mean of its tasks' gains, with
  two standard errors: over seeds (of the per-seed means over the group's tasks, on the seeds
  every task has: the fine-tuning noise) and over tasks (of the per-task gains: which tasks
  happened to be chosen). The larger of the two is the group's standard error ``se``;
* the verdict of a group: ``gain`` only when the mean gain is above two standard errors
  (``se``) and no task of the group is a flagged loss; ``loss`` when the mean is below minus
  two standard errors; ``unclear`` otherwise; ``illustration`` with fewer than two seeds (no
  standard error: one seed is never a finding).

A gain means something only on a task the reference has learned in its fine-tunes. Each task's
*constant answer* is the test score of always giving one answer (the most common test label's
share; 0 for regression, where a constant has no rank correlation); a task is *not learned*
when the reference's mean score is not above it by more than two standard errors over seeds
(and at least :data:`LEARNED_MARGIN`). Such a task stays in the means and verdicts, flagged:
a gain there is a head start or chance, and fine-tuning longer is what measures it.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

VERDICTS = ("gain", "loss", "unclear", "illustration")
LEARNED_MARGIN = 0.01
"""How far above the constant answer (1 point) the reference must score, at the least, for a
task to count as learned."""


def score_stats(scores: Sequence[float]) -> dict:
  """{"mean", "std", "n"} of one model's scores on one task (std 0 for a single seed)."""
  values = np.asarray(list(scores), dtype=np.float64)
  if not len(values):
    return {"mean": math.nan, "std": math.nan, "n": 0}
  std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
  return {"mean": float(values.mean()), "std": std, "n": len(values)}


def mean_and_se(values: Sequence[float]) -> dict:
  """{"mean", "se", "n"}: the mean and its standard error std(ddof=1)/sqrt(n) (nan if n < 2)."""
  values = np.asarray(list(values), dtype=np.float64)
  n = len(values)
  mean = float(values.mean()) if n else math.nan
  se = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
  return {"mean": mean, "se": se, "n": n}


def paired_diffs(scores: Mapping[int, float], reference: Mapping[int, float]) -> dict[int, float]:
  """{seed: scores[seed] - reference[seed]} over the seeds both have."""
  return {s: float(scores[s]) - float(reference[s]) for s in sorted(set(scores) & set(reference))}


def task_gain(diffs: Mapping[int, float]) -> dict:
  """A task's gain from its paired differences: mean, se, n and ``loss`` (below -2 se)."""
  stats = mean_and_se(list(diffs.values()))
  stats["loss"] = bool(stats["n"] > 1 and stats["mean"] < -2 * stats["se"])
  return stats


def constant_score(task) -> float:
  """The test score of always giving one answer: the most common test label's share for a
  classification task, 0 for regression (a constant has no rank correlation)."""
  labels = np.asarray(task.splits["test"].labels)
  if task.kind == "regression" or not labels.size:
    return 0.0
  return float(np.unique(labels, return_counts=True)[1].max() / labels.size)


def learned(stats: Mapping, constant: float) -> bool:
  """Whether scores ({"mean", "std", "n"}) are above ``constant`` by more than two standard
  errors over seeds and at least :data:`LEARNED_MARGIN` (True when there is no score)."""
  if not stats["n"]:
    return True
  se = stats["std"] / math.sqrt(stats["n"]) if stats["n"] > 1 else 0.0
  return stats["mean"] - constant > max(LEARNED_MARGIN, 2 * se)


def group_gain(diffs: Mapping[str, Mapping[int, float]]) -> dict:
  """A group's gain from each task's paired differences ({task: {seed: difference}})."""
  scored = {t: d for t, d in diffs.items() if d}
  gains = {t: task_gain(d) for t, d in scored.items()}
  means = [g["mean"] for g in gains.values()]
  seeds = sorted(set.intersection(*(set(d) for d in scored.values()))) if scored else []
  by_seeds = mean_and_se([np.mean([scored[t][s] for t in scored]) for s in seeds])
  by_tasks = mean_and_se(means)
  defined = [se for se in (by_seeds["se"], by_tasks["se"]) if not math.isnan(se)]
  out = {"mean": float(np.mean(means)) if means else math.nan,
         "se_seeds": by_seeds["se"], "se_tasks": by_tasks["se"],
         "se": max(defined) if by_seeds["n"] > 1 else math.nan,
         "n_tasks": len(scored), "n_seeds": len(seeds),
         "losses": [t for t, g in gains.items() if g["loss"]]}
  out["verdict"] = verdict(out)
  return out


def verdict(group: Mapping) -> str:
  """One of :data:`VERDICTS` for a group's gain (see the module doc)."""
  if group["n_seeds"] < 2 or math.isnan(group["se"]):
    return "illustration"
  if group["mean"] > 2 * group["se"] and not group["losses"]:
    return "gain"
  if group["mean"] < -2 * group["se"]:
    return "loss"
  return "unclear"


def scores_by_seed(job, records: Sequence[dict]) -> dict[str, dict[str, dict[int, float]]]:
  """{model name: {task: {seed: score}}} for a ``pipeline.Job``'s models, tasks and seeds."""
  index = {job.key_of(r): r for r in records}
  out = {m.name: {t: {} for t in job.tasks} for m in job.models}
  for model, task, seed in job.runs():
    record = index.get(job.key(model, task, seed))
    if record is not None:
      out[model.name][task][job.seed_values[seed]] = float(record["score"])
  return out


def summarize(job, records: Sequence[dict],
              groups: Mapping[str, Sequence[str]] | None = None) -> dict:
  """Everything the tables and charts show, as plain JSON-able data.

  ``job``: a ``pipeline.Job`` (its first model is the reference); ``records``: its runs;
  ``groups``: named subsets of the tasks (held-in, held-out...); "all tasks" is added when
  the groups do not already cover exactly all tasks with one group.
  """
  by_seed = scores_by_seed(job, records)
  tasks = list(job.tasks)
  groups = {k: [t for t in v if t in job.tasks] for k, v in (groups or {}).items()}
  groups = {k: v for k, v in groups.items() if v}
  if list(groups.values()) != [tasks]:
    groups = {"all tasks": tasks, **groups}
  reference = job.models[0].name
  scores, gains = {}, {}
  for model in job.models:
    per_task = {}
    for task in tasks:
      values = by_seed[model.name][task]
      per_task[task] = {**score_stats(list(values.values())),
                        "scores": {str(s): v for s, v in sorted(values.items())}}
    group_means = {g: _nanmean([per_task[t]["mean"] for t in members])
                   for g, members in groups.items()}
    scores[model.name] = {"tasks": per_task, "groups": group_means}
    if model.name == reference:
      continue
    diffs = {t: paired_diffs(by_seed[model.name][t], by_seed[reference][t]) for t in tasks}
    gains[model.name] = {"tasks": {t: task_gain(diffs[t]) for t in tasks},
                         "groups": {g: group_gain({t: diffs[t] for t in members})
                                    for g, members in groups.items()}}
  constant = {t: constant_score(job.tasks[t]) for t in tasks}
  return {"mode": job.mode, "seeds": job.seed_values, "recipe_key": job.recipe_key,
          "reference": reference, "tasks": tasks, "groups": groups, "constant": constant,
          "not_learned": [t for t in tasks
                          if not learned(scores[reference]["tasks"][t], constant[t])],
          "models": [{"name": m.name, "sha256": m.sha256} for m in job.models],
          "scores": scores, "gains": gains}


def _nanmean(values) -> float:
  values = [v for v in values if not math.isnan(v)]
  return float(np.mean(values)) if values else math.nan


def json_safe(value):
  """``value`` with NaN (an undefined mean or standard error) as None: strict JSON."""
  if isinstance(value, float) and math.isnan(value):
    return None
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  return value
