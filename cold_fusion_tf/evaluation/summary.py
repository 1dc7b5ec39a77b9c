"""Model-recycling summaries: scores, paired gains with standard errors, tables and a chart.

Scores are a task's test metric (accuracy; Spearman for regression) x 100, as mean and
standard deviation over seeds. A base's gain on a task is the mean over seeds of the paired
difference (base - reference, same seed, so the same head initialisation and data order),
with standard error std(differences, ddof=1) / sqrt(n). A group's gain (all tasks, held-in,
held-out) pools the paired differences of all its (task, seed) pairs the same way; with the
same seeds on every task its mean is the unweighted average of the per-task gains.
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Mapping, Sequence

import numpy as np

from cold_fusion_tf.evaluation import finetune as evaluation


def scores_by_seed(job, records: Sequence[dict]) -> dict[str, dict[str, dict[int, float]]]:
  """{model name: {task: {seed: score}}} for a ``recycling.Job``'s models, tasks and seeds."""
  index = {job.key_of(r): r for r in records}
  out = {m.name: {t: {} for t in job.tasks} for m in job.models}
  for model, task, seed in job.runs():
    record = index.get(job.key(model, task, seed))
    if record is not None:
      out[model.name][task][job.seed_values[seed]] = float(record["score"])
  return out


def summarize(job, records: Sequence[dict],
              groups: Mapping[str, Sequence[str]] | None = None) -> dict:
  """Everything the tables and the chart show, as plain JSON-able data (``job``: a
  ``recycling.Job``; ``records``: its runs' lines of results.jsonl)."""
  by_seed = scores_by_seed(job, records)
  tasks = list(job.tasks)
  groups = {"all tasks": tasks, **{k: list(v) for k, v in (groups or {}).items()
                                   if list(v) != tasks}}
  reference = job.models[0].name
  scores, gains = {}, {}
  for model in job.models:
    per_task = {}
    for task in tasks:
      values = by_seed[model.name][task]
      stats = evaluation.summarize(list(values.values())) if values else None
      per_task[task] = {"mean": stats["score"] if stats else math.nan,
                        "std": stats["std"] if stats else math.nan, "n": len(values),
                        "scores": {str(s): v for s, v in sorted(values.items())}}
    group_means = {g: _nanmean([per_task[t]["mean"] for t in members])
                   for g, members in groups.items()}
    scores[model.name] = {"tasks": per_task, "groups": group_means}
    if model.name == reference:
      continue
    task_gains = {t: evaluation.mean_and_se(evaluation.paired_diffs(
        by_seed[model.name][t], by_seed[reference][t])) for t in tasks}
    group_gains = {}
    for g, members in groups.items():
      diffs = [d for t in members for d in evaluation.paired_diffs(by_seed[model.name][t],
                                                                   by_seed[reference][t])]
      group_gains[g] = evaluation.mean_and_se(diffs)
    gains[model.name] = {"tasks": task_gains, "groups": group_gains}
  return {"mode": job.mode, "seeds": job.seed_values, "recipe_key": job.recipe_key,
          "reference": reference, "tasks": tasks, "groups": groups,
          "models": [{"name": m.name, "sha256": m.sha256, "directory": m.directory}
                     for m in job.models],
          "scores": scores, "gains": gains}


def _nanmean(values) -> float:
  values = [v for v in values if not math.isnan(v)]
  return float(np.mean(values)) if values else math.nan


def _pct(value: float) -> str:
  return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _gain(stats: Mapping) -> str:
  if not stats["n"]:
    return "-"
  text = f"{100 * stats['mean']:+.2f}"
  if not math.isnan(stats["se"]):
    text += f" ± {100 * stats['se']:.2f}"
  return text


def _significance(stats: Mapping) -> str:
  """How many standard errors the gain is from 0 (blank when undefined)."""
  if not stats["n"] or math.isnan(stats["se"]) or stats["se"] == 0:
    return ""
  return f"{stats['mean'] / stats['se']:+.1f}"


def markdown(summary: Mapping) -> str:
  """A model-card style score table, then the gains against the reference."""
  tasks, groups, reference = summary["tasks"], summary["groups"], summary["reference"]
  seeds = len(summary["seeds"])
  mode = {"finetune": "full fine-tuning", "probe": "linear probe (frozen body)"}[summary["mode"]]
  lines = [f"Model recycling, {mode}: test accuracy x 100 (Spearman x 100 for regression), "
           f"mean ± std over {seeds} seed(s); avg = unweighted mean over tasks.", ""]
  group_names = [g for g in groups if g != "all tasks"]
  header = ["model", "avg"] + [f"avg {g}" for g in group_names] + tasks
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for model in summary["models"]:
    name = model["name"]
    row = summary["scores"][name]
    cells = [f"{name} (reference)" if name == reference else name,
             _pct(row["groups"]["all tasks"])] + [_pct(row["groups"][g]) for g in group_names]
    for task in tasks:
      stats = row["tasks"][task]
      cell = _pct(stats["mean"])
      if stats["n"] > 1:
        cell += f" ± {100 * stats['std']:.1f}"
      cells.append(cell)
    lines.append("| " + " | ".join(cells) + " |")
  for name, gain in summary["gains"].items():
    lines += ["", f"Gain of {name} over {reference} (points, paired by seed, ± standard "
                  "error; z = gain / standard error):", "",
              "| task | group | gain | z | seeds |", "|---|---|---|---|---|"]
    membership = {t: g for g in group_names for t in groups[g]}
    for task in tasks:
      stats = gain["tasks"][task]
      lines.append(f"| {task} | {membership.get(task, '')} | {_gain(stats)} | "
                   f"{_significance(stats)} | {stats['n']} |")
    for g, stats in gain["groups"].items():
      lines.append(f"| **mean, {g}** | | **{_gain(stats)}** | {_significance(stats)} | "
                   f"{stats['n']} |")
  return "\n".join(lines) + "\n"


def to_csv(summary: Mapping) -> str:
  """One row per (model, task or group): mean, std, seeds; gain and its standard error."""
  buffer = io.StringIO()
  writer = csv.writer(buffer)
  writer.writerow(["model", "task", "mean", "std", "n", "gain", "gain_se"])
  for model in summary["models"]:
    name = model["name"]
    row, gain = summary["scores"][name], summary["gains"].get(name)
    for task in summary["tasks"]:
      stats = row["tasks"][task]
      g = gain["tasks"][task] if gain else {"mean": "", "se": ""}
      writer.writerow([name, task, stats["mean"], stats["std"], stats["n"], g["mean"], g["se"]])
    for group in summary["groups"]:
      g = gain["groups"][group] if gain else {"mean": "", "se": "", "n": ""}
      writer.writerow([name, f"mean:{group}", row["groups"][group], "", g.get("n", ""),
                       g["mean"], g["se"]])
  return buffer.getvalue()


def plot(summary: Mapping, path: str) -> None:
  """Per-task and group-mean gains (points) of each base, with standard-error bars."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  labels = list(summary["tasks"]) + [f"mean, {g}" for g in summary["groups"]]
  bases = list(summary["gains"])
  fig, ax = plt.subplots(figsize=(7.0, 1.2 + 0.35 * len(labels) * max(1, len(bases))), dpi=100)
  height = 0.8 / max(1, len(bases))
  for i, name in enumerate(bases):
    gain = summary["gains"][name]
    stats = [gain["tasks"][t] for t in summary["tasks"]] + list(gain["groups"].values())
    values = [100 * s["mean"] if s["n"] else 0.0 for s in stats]
    errors = [0.0 if math.isnan(s["se"]) else 100 * s["se"] for s in stats]
    positions = [j + (i - (len(bases) - 1) / 2) * height for j in range(len(labels))]
    ax.barh(positions, values, height=height, xerr=errors, capsize=2, label=name)
  ax.axvline(0, color="black", linewidth=0.8)
  ax.set_yticks(range(len(labels)))
  ax.set_yticklabels(labels)
  ax.invert_yaxis()
  ax.set_xlabel(f"gain over {summary['reference']} (points, ± standard error)")
  subject = bases[0] if len(bases) == 1 else f"{len(bases)} bases"
  ax.set_title(f"Model recycling of {subject} ({summary['mode']}, "
               f"{len(summary['seeds'])} seed(s))", fontsize=9)
  if len(bases) > 1:
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def _json_safe(value):
  """``value`` with NaN (an undefined mean or standard error) as None: strict JSON."""
  if isinstance(value, float) and math.isnan(value):
    return None
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  return value


def suffix(mode: str) -> str:
  return "" if mode == "finetune" else f"_{mode}"


def write(results, summary: Mapping) -> list[str]:
  """summary[_probe].json/.csv/.md and gains[_probe].png in the results directory."""
  end = suffix(summary["mode"])
  names = [f"summary{end}.json", f"summary{end}.csv", f"summary{end}.md", f"gains{end}.png"]
  results.write_text(names[0], json.dumps(_json_safe(summary), indent=2, sort_keys=True,
                                          allow_nan=False) + "\n")
  results.write_text(names[1], to_csv(summary))
  results.write_text(names[2], "# Model recycling\n\n" + markdown(summary)
                     + f"\n![gains]({names[3]})\n")
  plot(summary, results.file(names[3]))
  return [results.file(n) for n in names]
