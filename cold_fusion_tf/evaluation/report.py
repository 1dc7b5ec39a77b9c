"""The loop's report: a markdown table, a CSV file and a PNG plot of scores over iterations."""

from __future__ import annotations

import csv
import io
import math
from typing import Mapping, Sequence

import numpy as np


def group_means(scores: Mapping[str, dict], names: Sequence[str]) -> float:
  values = [scores[n]["score"] for n in names if n in scores]
  return float(np.mean(values)) if values else math.nan


def rows(evaluations: Mapping[int, dict], held_in: Sequence[str], held_out: Sequence[str]):
  """One row per evaluated iteration: means, gains over iteration 0, per-task scores."""
  out = []
  reference = evaluations.get(0, {}).get("scores", {})
  for iteration in sorted(evaluations):
    scores = evaluations[iteration]["scores"]
    row = {"iteration": iteration,
           "held_in": group_means(scores, held_in), "held_out": group_means(scores, held_out)}
    row["held_in_gain"] = row["held_in"] - group_means(reference, held_in)
    row["held_out_gain"] = row["held_out"] - group_means(reference, held_out)
    row["contributors"] = ", ".join(evaluations[iteration].get("contributors", []))
    for name in list(held_in) + list(held_out):
      row[name] = scores.get(name, {}).get("score", math.nan)
    out.append(row)
  return out


def _pct(value: float) -> str:
  return "-" if math.isnan(value) else f"{100 * value:.1f}"


def _gain(value: float) -> str:
  return "-" if math.isnan(value) else f"{100 * value:+.1f}"


def markdown(table, held_in, held_out) -> str:
  """The per-iteration table (scores in points: accuracy or Spearman x 100)."""
  header = (["iteration", "held-in mean", "gain", "held-out mean", "gain"] + list(held_in)
            + [f"{n} (held out)" for n in held_out] + ["fused contributors"])
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in table:
    cells = [str(row["iteration"]) + (" (original base)" if row["iteration"] == 0 else ""),
             _pct(row["held_in"]), _gain(row["held_in_gain"]), _pct(row["held_out"]),
             _gain(row["held_out_gain"])]
    cells += [_pct(row[n]) for n in list(held_in) + list(held_out)]
    cells.append(row["contributors"] or "-")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def summary(table) -> str:
  """One sentence comparing the newest fused base with the original base."""
  if all(math.isnan(row[k]) for row in table for k in ("held_in", "held_out")):
    return ("No base has been scored (eval.enabled is off); compare the newest base with "
            "the original by `python -m cold_fusion_tf.evaluate --config=<config> "
            "--store=<store>`.")
  if len(table) < 2:
    return "Only the original base has been evaluated so far."
  last = table[-1]
  return (f"Fused base {last['iteration']} vs the original base: held-in "
          f"{_pct(last['held_in'])} ({_gain(last['held_in_gain'])} points), held-out "
          f"{_pct(last['held_out'])} ({_gain(last['held_out_gain'])} points).")


def to_csv(table, held_in, held_out) -> str:
  fields = (["iteration", "held_in", "held_in_gain", "held_out", "held_out_gain"]
            + list(held_in) + list(held_out) + ["contributors"])
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
  writer.writeheader()
  for row in table:
    writer.writerow(row)
  return buffer.getvalue()


def plot(table, held_in, held_out, path: str) -> None:
  """Held-in and held-out mean scores over iterations, the original base as a line."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
  iterations = [r["iteration"] for r in table]
  for key, label, color in (("held_in", "held-in tasks", "tab:blue"),
                            ("held_out", "held-out tasks", "tab:orange")):
    values = [100 * r[key] for r in table]
    ax.plot(iterations, values, marker="o", label=label, color=color)
    if table:
      ax.axhline(100 * table[0][key], color=color, linestyle=":", linewidth=1)
  ax.set_xlabel("ColD Fusion iteration (0 = original base)")
  ax.set_ylabel("mean score (accuracy / Spearman x 100)")
  ax.set_xticks(iterations)
  ax.set_title(f"Held-in: {', '.join(held_in)}\nHeld-out: {', '.join(held_out)}", fontsize=8)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
