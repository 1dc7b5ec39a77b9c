"""A contributor: fine-tune the latest base on one dataset, upload only the body."""

from __future__ import annotations

import os
from typing import Callable

from absl import logging

from cold_fusion_tf import data as data_lib
from cold_fusion_tf import models
from cold_fusion_tf import paths
from cold_fusion_tf import store as store_lib
from cold_fusion_tf import training
from cold_fusion_tf import weights
from cold_fusion_tf.errors import UserError


def load_task(config, name: str) -> data_lib.TaskData:
  """A dataset from the config's data settings (validated; no training time spent yet)."""
  return data_lib.load_task(name, dirs=list(config.data.dirs), columns=dict(config.data.columns),
                            max_examples=dict(config.data.max_examples))


def contribute(store: store_lib.Store, config, task_name: str, contributor_id: str = "",
               task: data_lib.TaskData | None = None, strategy=None,
               log: Callable[[str], None] = logging.info) -> dict:
  """Trains one contribution for the latest base and writes it to the store.

  Everything that can be checked (store, base, dataset, contributor id, an earlier
  contribution under the same id) is checked before training starts.
  """
  iteration = store.require_latest()
  task = task or load_task(config, task_name)
  dataset = data_lib.dataset_id(task_name)
  contributor_id = paths.check_path_part(contributor_id or dataset, "Contributor id")
  if store.has_contribution(iteration, contributor_id):
    raise UserError(f"{store.uri}: {contributor_id!r} already contributed to iteration "
                    f"{iteration}; choose another --config.contributor_id or wait for the "
                    "next base.")
  base_dir = store.base_dir(iteration)
  base_sha = store.base_sha256(iteration)
  models.set_seed(config.recipe.seed)
  body = models.load_body(base_dir)
  tokenizer = models.load_tokenizer(base_dir)
  result = training.finetune(body, tokenizer, task, config.recipe, strategy=strategy, log=log,
                             label=f"[{contributor_id} @ base {iteration}] ")
  with store_lib.staging_dir("body") as work:
    body_path = os.path.join(work, store_lib.BODY)
    weights.save_safetensors(weights.body_tensors(body), body_path)
    meta = store.put_contribution(iteration, contributor_id, body_path, {
        "base_sha256": base_sha, "dataset": dataset, "num_examples": len(task.splits["train"]),
        "steps": result.steps, "best_step": result.best_step,
        "examples_seen": result.examples_seen,
        "dev_metrics": {k: float(v) for k, v in result.dev.items()},
        "seconds": round(result.seconds, 1)})
  log(f"[{contributor_id}] contributed to iteration {iteration}: dev score "
      f"{result.dev['score']:.4f} after {result.steps} steps")
  return meta
