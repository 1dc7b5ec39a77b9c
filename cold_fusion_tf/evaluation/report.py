"""Tables and charts of model recycling, for the evaluate program and for the loop's report.

Both draw from one summary (:func:`cold_fusion_tf.evaluation.summary.summarize`): scores per
model and task (points: accuracy or Spearman x 100, mean ± std over seeds), each base's gain
over the reference per task with its standard error and a flag on every task that loses more
than two standard errors, group means with their standard errors, and the verdict.

* the evaluate program: ``summary.md/.csv/.json`` and ``gains.png`` (:func:`write`);
* the loop: ``report.md/.csv/.png`` in the store (:func:`loop_markdown`, :func:`to_csv`,
  :func:`plot_iterations`), the bases named ``base N``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Mapping, Sequence

from cold_fusion_tf.evaluation import summary as summary_lib

_VERDICT_TEXT = {
    "gain": "a gain: the mean is above two standard errors and no task loses more than two",
    "loss": "a loss: the mean is below minus two standard errors",
    "unclear": "not shown to help: within two standard errors of no change",
    "illustration": "one seed: an illustration, not a finding (no standard error)",
}


def _pct(value) -> str:
  return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _pm(mean, se) -> str:
  """``+1.23 ± 0.45`` points (the ± part only when the standard error is defined)."""
  if mean is None or math.isnan(mean):
    return "-"
  text = f"{100 * mean:+.2f}"
  return text if se is None or math.isnan(se) else f"{text} ± {100 * se:.2f}"


def _z(mean, se) -> str:
  """How many standard errors the gain is from 0 (blank when undefined)."""
  if mean is None or se is None or math.isnan(mean) or math.isnan(se) or se == 0:
    return ""
  return f"{mean / se:+.1f}"


def _row(cells) -> str:
  return "| " + " | ".join(str(c) for c in cells) + " |"


def _named_groups(summary) -> list[str]:
  return [g for g in summary["groups"] if g != "all tasks"] or ["all tasks"]


def scores_table(summary: Mapping, extra: Mapping[str, str] | None = None,
                 extra_header: str = "") -> list[str]:
  """One row per model: group means with their gains, then every task's mean ± std."""
  groups, tasks, reference = _named_groups(summary), summary["tasks"], summary["reference"]
  header = ["model"] + [c for g in groups for c in (f"{g} mean", "gain")] + tasks
  header += [extra_header] if extra is not None else []
  lines = [_row(header), "|" + "---|" * len(header)]
  for model in summary["models"]:
    name = model["name"]
    row, gain = summary["scores"][name], summary["gains"].get(name)
    cells = [f"{name} (reference)" if name == reference else name]
    for g in groups:
      stats = gain["groups"][g] if gain else None
      cells += [_pct(row["groups"][g]), _pm(stats["mean"], stats["se"]) if stats else "-"]
    for task in tasks:
      stats = row["tasks"][task]
      cells.append(_pct(stats["mean"]) + (f" ± {100 * stats['std']:.1f}" if stats["n"] > 1
                                          else ""))
    if extra is not None:
      cells.append(extra.get(name, "") or "-")
    lines.append(_row(cells))
  constant = summary.get("constant")
  if constant:
    cells = ["(one constant answer)"] + ["-"] * (2 * len(groups))
    cells += [_pct(constant[t]) for t in tasks] + (["-"] if extra is not None else [])
    lines.append(_row(cells))
  return lines


def gains_table(summary: Mapping, name: str) -> list[str]:
  """Per task: reference and base scores, the gain ± standard error, z, seeds, a loss flag;
  then each group's mean gain, its two standard errors and the verdict."""
  reference, groups = summary["reference"], summary["groups"]
  membership = {t: g for g in _named_groups(summary) for t in groups[g]}
  gain = summary["gains"][name]
  not_learned = set(summary.get("not_learned", ()))
  lines = [f"Gain of {name} over {reference} (points, paired by seed, ± standard error over "
           "seeds; z = gain / standard error; LOSS: below minus two standard errors; not "
           f"learned: {reference} no better than one constant answer):", "",
           _row(["task", "group", reference, name, "gain", "z", "seeds", ""]),
           "|---|---|---|---|---|---|---|---|"]
  for task in summary["tasks"]:
    stats = gain["tasks"][task]
    lines.append(_row([task, membership.get(task, ""),
                       _pct(summary["scores"][reference]["tasks"][task]["mean"]),
                       _pct(summary["scores"][name]["tasks"][task]["mean"]),
                       _pm(stats["mean"], stats["se"]), _z(stats["mean"], stats["se"]),
                       stats["n"], _flags(stats["loss"], task in not_learned)]))
  lines += ["", _row(["group", "tasks", "mean gain", "± over seeds", "± over tasks", "z",
                      "verdict"]), "|---|---|---|---|---|---|---|"]
  for g, stats in gain["groups"].items():
    lines.append(_row([g, stats["n_tasks"], _pm(stats["mean"], None),
                       _pm(stats["se_seeds"], None).lstrip("+"),
                       _pm(stats["se_tasks"], None).lstrip("+"),
                       _z(stats["mean"], stats["se"]), f"**{stats['verdict']}**"]))
  return lines + [""] + verdict_lines(summary, name) + not_learned_lines(summary)


def _flags(loss: bool, not_learned: bool) -> str:
  return ", ".join(f for f, on in (("**LOSS**", loss), ("not learned", not_learned)) if on)


def not_learned_lines(summary: Mapping) -> list[str]:
  """What a task the reference did not learn means, and how to measure it."""
  names = summary.get("not_learned") or []
  if not names:
    return []
  scores = summary["scores"][summary["reference"]]["tasks"]
  listed = ", ".join(f"{t} ({_pct(scores[t]['mean'])} against {_pct(summary['constant'][t])})"
                     for t in names)
  return ["", f"Not learned by {summary['reference']} in these fine-tunes: {listed}. Its scores "
          "are no better than always giving the most common test answer (0 for regression), "
          "so a gain there is a head start or chance, not a better start; the task is kept in "
          "the means. To measure it, fine-tune longer (eval.recipe.epochs, "
          "eval.max_train_examples) or leave it out."]


def verdict_lines(summary: Mapping, name: str) -> list[str]:
  """One sentence per group: the mean gain, its standard error, flagged losses, the verdict."""
  lines = []
  for g, stats in summary["gains"][name]["groups"].items():
    text = (f"- {g}: {_pm(stats['mean'], stats['se'])} points over {stats['n_tasks']} task(s) "
            f"and {stats['n_seeds']} seed(s): {_VERDICT_TEXT[stats['verdict']]}")
    if stats["losses"]:
      losses = summary["gains"][name]["tasks"]
      text += "; flagged losses: " + ", ".join(
          f"{t} ({_pm(losses[t]['mean'], losses[t]['se'])})" for t in stats["losses"])
    lines.append(text + ".")
  return lines


def markdown(summary: Mapping) -> str:
  """The evaluate program's summary: the score table, then each base's gains and verdict."""
  mode = {"finetune": "full fine-tuning", "probe": "linear probe (frozen body)"}[summary["mode"]]
  lines = [f"Model recycling, {mode}: test accuracy x 100 (Spearman x 100 for regression), "
           f"mean ± std over {len(summary['seeds'])} seed(s); a group's mean is the unweighted "
           "mean over its tasks, its gain ± the larger of the standard errors over seeds and "
           "over tasks.", ""]
  lines += _one_seed_note(summary) + scores_table(summary)
  for name in summary["gains"]:
    lines += [""] + gains_table(summary, name)
  return "\n".join(lines) + "\n"


def _one_seed_note(summary) -> list[str]:
  if len(summary["seeds"]) > 1:
    return []
  return ["**One seed: an illustration, not a finding.** A standard error needs at least two "
          "seeds (eval.seeds, or --seeds of the evaluate program).", ""]


def loop_markdown(summary: Mapping, contributors: Mapping[str, str], store_uri: str,
                  recipe: str) -> str:
  """The loop's report.md: scores per evaluated base, then the newest base's gains."""
  lines = ["# ColD Fusion report", "",
           f"Store: `{store_uri}`. Every evaluated base is fine-tuned on each task with a fresh "
           f"head ({recipe}; {len(summary['seeds'])} seed(s), the same for every base), and "
           "scored on the test split: accuracy (Spearman for regression) x 100, mean ± std "
           "over seeds. Gains are against the original base (base 0), paired by seed.", ""]
  lines += _one_seed_note(summary)
  lines += scores_table(summary, contributors, "fused contributors")
  if summary["gains"]:
    lines += ["", "## The newest base against the original", ""]
    lines += gains_table(summary, list(summary["gains"])[-1])
  elif all(s["n"] == 0 for row in summary["scores"].values() for s in row["tasks"].values()):
    lines += ["", "No base has been scored (eval.enabled is off); compare the newest base with "
              "the original by `python -m cold_fusion_tf.evaluate --config=<config> "
              "--store=<store>`."]
  else:
    lines += ["", "Only the original base has been evaluated so far."]
  return "\n".join(lines) + "\n"


def to_csv(summary: Mapping) -> str:
  """One row per (model, task) and per (model, group mean): score, std, seeds; gain, its
  standard errors and z; the loss flag (tasks) or the verdict (groups)."""
  buffer = io.StringIO()
  writer = csv.writer(buffer)
  writer.writerow(["model", "task", "mean", "std", "n", "gain", "gain_se", "gain_se_seeds",
                   "gain_se_tasks", "z", "flag", "constant"])
  nan = math.nan
  not_learned, constant = set(summary.get("not_learned", ())), summary.get("constant", {})
  for model in summary["models"]:
    name = model["name"]
    row, gain = summary["scores"][name], summary["gains"].get(name)
    for task in summary["tasks"]:
      stats = row["tasks"][task]
      g = gain["tasks"][task] if gain else {"mean": nan, "se": nan, "loss": False}
      writer.writerow([name, task, _num(stats["mean"]), _num(stats["std"]), stats["n"],
                       _num(g["mean"]), _num(g["se"]), "", "", _z(g["mean"], g["se"]),
                       " ".join(f for f, on in (("loss", g["loss"]),
                                                ("not-learned", task in not_learned)) if on),
                       _num(constant.get(task, nan))])
    for group in summary["groups"]:
      g = gain["groups"][group] if gain else None
      cells = ([_num(g["mean"]), _num(g["se"]), _num(g["se_seeds"]), _num(g["se_tasks"]),
                _z(g["mean"], g["se"]), g["verdict"]] if g else [""] * 6)
      writer.writerow([name, f"mean:{group}", _num(row["groups"][group]), "",
                       g["n_seeds"] if g else ""] + cells + [""])
  return buffer.getvalue()


def _num(value) -> str:
  return "" if value is None or math.isnan(value) else f"{value:.6g}"


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _errors(stats: Sequence[Mapping], key: str = "se") -> list[float]:
  return [0.0 if s[key] is None or math.isnan(s[key]) else 100 * s[key] for s in stats]


def plot_gains(summary: Mapping, path: str) -> None:
  """Per-task and group-mean gains (points) of each base, with standard-error bars."""
  plt = _pyplot()
  labels = list(summary["tasks"]) + [f"mean, {g}" for g in summary["groups"]]
  bases = list(summary["gains"])
  fig, ax = plt.subplots(figsize=(7.0, 1.2 + 0.35 * len(labels) * max(1, len(bases))), dpi=100)
  height = 0.8 / max(1, len(bases))
  for i, name in enumerate(bases):
    gain = summary["gains"][name]
    stats = [gain["tasks"][t] for t in summary["tasks"]] + list(gain["groups"].values())
    values = [0.0 if math.isnan(s["mean"]) else 100 * s["mean"] for s in stats]
    positions = [j + (i - (len(bases) - 1) / 2) * height for j in range(len(labels))]
    ax.barh(positions, values, height=height, xerr=_errors(stats), capsize=2, label=name)
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


def plot_iterations(summary: Mapping, iterations: Mapping[str, int], path: str) -> None:
  """Each group's mean gain over the original base, per evaluated iteration, ± its standard
  error (the original base is the zero line)."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
  names = [m["name"] for m in summary["models"]]
  xs = [iterations[n] for n in names]
  for group in _named_groups(summary):
    stats = [{"mean": 0.0, "se": math.nan}] + [summary["gains"][n]["groups"][group]
                                               for n in names[1:]]
    ax.errorbar(xs, [0.0 if math.isnan(s["mean"]) else 100 * s["mean"] for s in stats],
                yerr=_errors(stats), marker="o", capsize=3,
                label=f"{group} ({len(summary['groups'][group])} tasks)")
  ax.axhline(0, color="black", linestyle=":", linewidth=1)
  ax.set_xlabel("ColD Fusion iteration (0 = original base)")
  ax.set_ylabel("mean gain over the original base (points)")
  ax.set_xticks(xs)
  ax.set_title(f"± standard error, {len(summary['seeds'])} seed(s)", fontsize=8)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def suffix(mode: str) -> str:
  return "" if mode == "finetune" else f"_{mode}"


def write(results, summary: Mapping) -> list[str]:
  """summary[_probe].json/.csv/.md and gains[_probe].png in the results directory."""
  end = suffix(summary["mode"])
  names = [f"summary{end}.json", f"summary{end}.csv", f"summary{end}.md", f"gains{end}.png"]
  results.write_text(names[0], json.dumps(summary_lib.json_safe(summary), indent=2,
                                          sort_keys=True, allow_nan=False) + "\n")
  results.write_text(names[1], to_csv(summary))
  results.write_text(names[2], "# Model recycling\n\n" + markdown(summary)
                     + f"\n![gains]({names[3]})\n")
  plot_gains(summary, results.file(names[3]))
  return [results.file(n) for n in names]
