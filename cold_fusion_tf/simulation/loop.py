"""The whole ColD Fusion loop on one machine: contributors, fusion, evaluation, report.

Every step leaves its result in the store, so running the same command again resumes where
the last run stopped (finished contributions, published bases and evaluations are reused).
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable

from absl import logging
import numpy as np

from cold_fusion_tf.training import contributor
from cold_fusion_tf import data as data_lib
from cold_fusion_tf.evaluation import finetune as evaluation
from cold_fusion_tf.evaluation import pipeline
from cold_fusion_tf.evaluation import report
from cold_fusion_tf.evaluation import summary as summary_lib
from cold_fusion_tf import fusion
from cold_fusion_tf import progress
from cold_fusion_tf.simulation import resume
from cold_fusion_tf.simulation import scalars
from cold_fusion_tf.model.base_zero import ensure_store
from cold_fusion_tf import store as store_lib
from cold_fusion_tf.store import layout
from cold_fusion_tf.store import refs
from cold_fusion_tf.errors import UserError


def sample_contributors(pool, k: int, seed: int, iteration: int) -> list[str]:
  """The datasets contributing at ``iteration`` (deterministic, so reruns resume)."""
  if k > len(pool):
    raise UserError(f"contributors_per_iteration={k} exceeds the pool of {len(pool)} datasets.")
  rng = np.random.default_rng([seed, iteration])
  return [pool[i] for i in sorted(rng.choice(len(pool), size=k, replace=False))]


def check_config(config) -> None:
  if config.iterations < 0 or config.contributors_per_iteration < 1:
    raise UserError("iterations must be >= 0 and contributors_per_iteration >= 1.")
  if not config.pool:
    raise UserError("config.pool is empty: list the datasets contributors are drawn from.")
  if config.contributors_per_iteration > len(config.pool):
    raise UserError(f"config.contributors_per_iteration={config.contributors_per_iteration} "
                    f"exceeds the pool of {len(config.pool)} datasets (config.pool); sample at "
                    "most that many, or add datasets to the pool.")
  pipeline.resolve_tasks(config, "all")  # dataset names, and none both held in and held out
  if config.eval.every < 0 or config.eval.seeds < 1:
    raise UserError(f"config.eval.every={config.eval.every} must be >= 0 (0: only base 0 and "
                    f"the last) and config.eval.seeds={config.eval.seeds} >= 1.")


def run(config, store_uri: str, log: Callable[[str], None] = logging.info,
        logdir: str | None = None) -> dict:
  """Runs (or resumes) the loop up to ``config.iterations``; returns the report's summary
  (:func:`cold_fusion_tf.evaluation.summary.summarize`). TensorBoard scalars of each base go
  to ``logdir`` (default: ``<store>/tensorboard`` for a local store; see
  :mod:`cold_fusion_tf.simulation.scalars`)."""
  check_config(config)
  # Every dataset is loaded and validated before any training time is spent.
  tasks = {name: contributor.load_task(config, name)
           for name in list(config.pool) + list(config.heldout)}
  store = store_lib.Store(store_uri)
  evaluator = _Evaluator(store, config, tasks)  # checks config.eval before the store is made
  run_scalars = scalars.open_for(store.uri, logdir)  # checks --logdir likewise

  def sample(it: int) -> list[str]:
    return sample_contributors(list(config.pool), config.contributors_per_iteration,
                               config.seed, it)

  # A rerun: the same model, no trained-on task held out, the open iteration's settings.
  resume.check_rerun(store, config, tasks, sample, log)
  ensure_store(store, config, log)

  iteration = store.require_latest()
  last = max(config.iterations, iteration)
  if run_scalars is not None:  # bases fused by a run stopped before it recorded them
    run_scalars.fusions(store, iteration)
  for it in range(iteration + 1):  # base 0, and bases published earlier but not yet evaluated
    if _due(config, it, last):
      evaluator.evaluate(it, log)
  summary = evaluator.write_report()
  if run_scalars is not None:
    run_scalars.evaluation(summary, {f"base {it}": it for it in range(iteration + 1)})
  first, run_progress = iteration, progress.Tracker(config.iterations - iteration, "iterations")
  while iteration < config.iterations:
    chosen = sample(iteration)
    settings = resume.iteration_settings(config, chosen, tasks)
    if resume.check_open_iteration(store, iteration, settings):  # before its first contributor
      resume.write_record(store, iteration, settings)
    log(f"=== iteration {iteration}: contributors {', '.join(chosen)}")
    for name in chosen:
      cid = data_lib.dataset_id(name)
      if store.has_contribution(iteration, cid):
        log(f"[{cid}] already contributed to iteration {iteration}; reusing it")
        continue
      # The next contributor reuses this one's built model when the shapes fit
      # (training.model_cache), so the session is not cleared between them.
      contributor.contribute(store, config, name, cid, task=tasks[name], log=log)
    outcome = fusion.fuse_config(store, config.fusion, log=log)
    if outcome.published is None and store.require_latest() == iteration:
      raise UserError(f"fusion of iteration {iteration} published nothing: {outcome.message}")
    iteration = store.require_latest()
    if run_scalars is not None and outcome.published is not None:
      run_scalars.fusion(store, outcome.published, outcome.timings.get("total"))
    if _due(config, iteration, last):
      evaluator.evaluate(iteration, log)
      summary = evaluator.write_report()
      if run_scalars is not None:
        run_scalars.evaluation(summary, {f"base {it}": it for it in range(iteration + 1)})
      log("\n" + evaluator.table)
    log(run_progress.line(iteration - first, "the run: "))
  summary = evaluator.write_report()
  log("\n" + evaluator.text)
  return summary


def _due(config, iteration: int, last: int) -> bool:
  """Whether base ``iteration`` is evaluated: base 0, the last one, and every eval.every-th."""
  every = int(config.eval.every)
  return config.eval.enabled and (iteration in (0, last) or bool(every and iteration % every == 0))


class _Evaluator:
  """Scores bases through the evaluate program's pipeline (runs in ``evaluations/<i>.json``,
  reused when the weights, data, mode, recipe and seed match) and writes the report."""

  def __init__(self, store, config, tasks):
    self.store, self.config = store, config
    names, self.groups = pipeline.resolve_tasks(config, config.eval.tasks)
    unknown = [n for n in names if n not in tasks]
    if unknown:
      raise UserError(f"config.eval.tasks={config.eval.tasks!r}: {', '.join(unknown)} is not in "
                      "config.pool or config.heldout; use pool, heldout or all.")
    self.tasks = {data_lib.dataset_id(n): pipeline.eval_task(config, tasks[n]) for n in names}
    self.task_keys = {t: pipeline.task_key(task) for t, task in self.tasks.items()}
    self.text = self.table = ""  # the report, and its table of scores per base

  def _job(self, models) -> pipeline.Job:
    return pipeline.Job(models, self.tasks, self.config.eval, int(self.config.eval.seeds),
                        task_keys=self.task_keys)

  def _runs(self, iteration: int) -> pipeline.StoreRuns:
    contributors = []
    if iteration > 0:
      contributors = [c["dataset"] for c in
                      self.store.manifest(iteration)["fusion"]["contributions"]]
    return pipeline.StoreRuns(self.store, iteration, contributors)

  def evaluate(self, iteration: int, log) -> None:
    model = refs.BaseRef(f"base {iteration}", self.store.base_dir(iteration),
                         self.store.base_sha256(iteration))
    log(f"evaluating base {iteration} on {len(self.tasks)} task(s)")
    pipeline.run(self._job([model]), self._runs(iteration), log)

  def write_report(self) -> dict:
    """report.md, report.csv and report.png from every evaluated base; returns the summary."""
    latest = self.store.require_latest()
    runs = {i: self._runs(i) for i in range(latest + 1)}
    models = {i: refs.BaseRef(f"base {i}", "", self.store.base_sha256(i))
              for i in runs if i == 0 or runs[i].runs}
    records = [r for i in models for r in runs[i].records()]
    scored = summary_lib.scores_by_seed(self._job(list(models.values())), records)
    models = {i: m for i, m in models.items()
              if i == 0 or any(scored[m.name][t] for t in self.tasks)}
    summary = summary_lib.summarize(self._job(list(models.values())), records, self.groups)
    recipe = evaluation.recipe_for(self.config.eval)
    cap = int(self.config.eval.max_train_examples)
    steps = f" (at most {recipe.max_steps} steps)" if recipe.max_steps else ""
    described = (f"{recipe.epochs:g} epoch(s) over {f'at most {cap}' if cap else 'all'} "
                 f"training examples{steps}, batch {recipe.batch_size}, learning rate "
                 f"{recipe.learning_rate:g}")
    contributors = {m.name: ", ".join(runs[i].contributors) for i, m in models.items()}
    self.text = report.loop_markdown(summary, contributors, self.store.uri, described)
    self.table = "\n".join(report.scores_table(summary, contributors, "fused contributors"))
    with tempfile.TemporaryDirectory() as tmp:
      md, csv_file, png = (os.path.join(tmp, name) for name in layout.REPORT_FILES)
      with open(md, "w", encoding="utf-8") as f:
        f.write(self.text + "\n![gains over iterations](report.png)\n")
      with open(csv_file, "w", encoding="utf-8") as f:
        f.write(report.to_csv(summary))
      report.plot_iterations(summary, {m.name: i for i, m in models.items()}, png)
      for path in (md, csv_file, png):
        self.store.write_file(os.path.basename(path), path)
    return summary
