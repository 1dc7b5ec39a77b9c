"""The whole ColD Fusion loop on one machine: contributors, fusion, evaluation, report.

Every step leaves its result in the store, so running the same command again resumes where
the last run stopped (finished contributions, published bases and evaluations are reused).
"""

from __future__ import annotations

import gc
import os
import tempfile
from typing import Callable

from absl import logging
import numpy as np
import tf_keras as keras

from cold_fusion_tf.training import contributor
from cold_fusion_tf import data as data_lib
from cold_fusion_tf.evaluation import finetune as evaluation
from cold_fusion_tf import fusion
from cold_fusion_tf.model import bodies as models
from cold_fusion_tf.store import paths
from cold_fusion_tf.evaluation import report
from cold_fusion_tf import store as store_lib
from cold_fusion_tf.errors import UserError


def ensure_store(store: store_lib.Store, config, log: Callable[[str], None]) -> None:
  """Creates the store from ``config.model.source`` if needed (publishing base 0)."""
  if store.exists() and store.latest() is not None:
    info = store.run_info()
    source = config.model.source
    if info.get("source_model") and info["source_model"] != source:
      log(f"note: the store was created from {info['source_model']!r}; "
          f"config.model.source={source!r} is ignored.")
    return
  source = models.resolve_source(config.model.source)
  log(f"creating store {store.uri} from {config.model.source}")
  body, tokenizer = models.load_source_model(source)
  with store_lib.staging_dir("base0") as work:
    models.write_base_dir(body, tokenizer, work)
    store.create(work, {"source_model": config.model.source,
                        "fusion_method": config.fusion.method,
                        "contributors_per_iteration": config.contributors_per_iteration})
  del body
  keras.backend.clear_session()


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
  overlap = set(config.pool) & set(config.heldout)
  if overlap:
    raise UserError(f"datasets {sorted(overlap)} are both in the pool and held out.")
  for name in list(config.pool) + list(config.heldout):
    data_lib.dataset_id(name)


def run(config, store_uri: str, log: Callable[[str], None] = logging.info) -> list[dict]:
  """Runs (or resumes) the loop up to ``config.iterations``; returns the report rows."""
  check_config(config)
  # Every dataset is loaded and validated before any training time is spent.
  tasks = {name: contributor.load_task(config, name)
           for name in list(config.pool) + list(config.heldout)}
  store = store_lib.Store(store_uri)
  ensure_store(store, config, log)
  held_in = [data_lib.dataset_id(n) for n in config.pool]
  held_out = [data_lib.dataset_id(n) for n in config.heldout]
  eval_tasks = {data_lib.dataset_id(n): t for n, t in tasks.items()}

  evaluations = {}
  _evaluate(store, 0, eval_tasks, config, evaluations, log)
  _write_report(store, evaluations, held_in, held_out, log)
  iteration = store.require_latest()
  for it in range(1, iteration + 1):  # bases published earlier but not yet evaluated
    _evaluate(store, it, eval_tasks, config, evaluations, log)
  while iteration < config.iterations:
    chosen = sample_contributors(list(config.pool), config.contributors_per_iteration,
                                 config.seed, iteration)
    log(f"=== iteration {iteration}: contributors {', '.join(chosen)}")
    for name in chosen:
      cid = data_lib.dataset_id(name)
      if store.has_contribution(iteration, cid):
        log(f"[{cid}] already contributed to iteration {iteration}; reusing it")
        continue
      contributor.contribute(store, config, name, cid, task=tasks[name], log=log)
      keras.backend.clear_session()
      gc.collect()
    outcome = fusion.fuse_config(store, config.fusion, log=log)
    if outcome.published is None and store.require_latest() == iteration:
      raise UserError(f"fusion of iteration {iteration} published nothing: {outcome.message}")
    iteration = store.require_latest()
    _evaluate(store, iteration, eval_tasks, config, evaluations, log)
    table = _write_report(store, evaluations, held_in, held_out, log)
    log("\n" + report.markdown(table, held_in, held_out))
  table = _write_report(store, evaluations, held_in, held_out, log)
  log("\n" + report.markdown(table, held_in, held_out) + "\n" + report.summary(table))
  return table


def _evaluate(store, iteration, tasks, config, evaluations, log) -> None:
  """Scores base ``iteration`` (reusing whatever the store already holds)."""
  name = f"evaluations/{paths.iteration_name(iteration)}.json"
  saved = store.read_json(name) or {}
  done = {t: v.get("scores", []) for t, v in saved.get("scores", {}).items()}
  contributors = []
  if iteration > 0:
    contributors = [c["dataset"] for c in store.manifest(iteration)["fusion"]["contributions"]]
  complete = config.eval.enabled and all(len(done.get(t, [])) >= config.eval.seeds for t in tasks)
  if config.eval.enabled and not complete:
    log(f"evaluating base {iteration} on {len(tasks)} task(s)")
    base_dir = store.base_dir(iteration)

    def save(task_name, scores):
      done[task_name] = scores
      store.write_json(name, {"iteration": iteration, "contributors": contributors,
                              "scores": {t: evaluation.summarize(s) for t, s in done.items()}})

    evaluation.score_base(base_dir, tasks, config.eval, log=log, label=f"[base {iteration}] ",
                          done=done, on_result=save)
  scores = {t: evaluation.summarize(s) for t, s in done.items() if s}
  evaluations[iteration] = {"scores": scores, "contributors": contributors}


def _write_report(store, evaluations, held_in, held_out, log):
  table = report.rows(evaluations, held_in, held_out)
  text = ("# ColD Fusion report\n\n"
          f"Store: `{store.uri}`. Scores are test accuracy (Spearman for regression) x 100 "
          "after a short fine-tune with a fresh head; gains are against the original base "
          "(iteration 0).\n\n" + report.markdown(table, held_in, held_out) + "\n"
          + report.summary(table) + "\n\n![scores over iterations](report.png)\n")
  store.storage.write_bytes("report.md", text.encode())
  store.storage.write_bytes("report.csv", report.to_csv(table, held_in, held_out).encode())
  with tempfile.TemporaryDirectory() as tmp:
    png = os.path.join(tmp, "report.png")
    report.plot(table, held_in, held_out, png)
    store.write_file("report.png", png)
  return table
