"""Model recycling: how good a base is as a starting point.

For each target task and seed, the base is fine-tuned with a fresh head (same recipe and
seeds for every base), the best dev checkpoint is kept, and its test score is recorded:
accuracy, or Spearman correlation for regression tasks.
"""

from __future__ import annotations

import gc
from typing import Callable, Mapping

from absl import logging
import numpy as np
import tf_keras as keras

from cold_fusion_tf import models
from cold_fusion_tf import training
from cold_fusion_tf.data import TaskData


def score_base(base_dir: str, tasks: Mapping[str, TaskData], eval_config,
               log: Callable[[str], None] = logging.info, label: str = "",
               done: Mapping[str, list[float]] | None = None,
               on_result: Callable[[str, list[float]], None] | None = None) -> dict:
  """{task: {"score": mean over seeds, "std": ..., "scores": [...]}} for one base.

  ``done`` holds scores already measured (task -> per-seed list) that are not redone;
  ``on_result`` is called after each task so callers can save progress.
  """
  tokenizer = models.load_tokenizer(base_dir)
  results = {}
  for name, task in tasks.items():
    scores = list((done or {}).get(name, []))
    for seed in range(len(scores), eval_config.seeds):
      recipe = eval_config.recipe.copy_and_resolve_references()
      recipe.seed = int(eval_config.recipe.seed) + seed
      models.set_seed(recipe.seed)
      body = models.load_body(base_dir)
      result = training.finetune(body, tokenizer, task, recipe, evaluate_test=True, log=log,
                                 label=f"{label}[eval {name} seed {seed}] ")
      scores.append(float(result.test["score"]))
      del body, result
      keras.backend.clear_session()
      gc.collect()
      if on_result:
        on_result(name, scores)
    results[name] = summarize(scores)
  return results


def summarize(scores: list[float]) -> dict:
  values = np.asarray(scores, dtype=np.float64)
  std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
  return {"score": float(values.mean()), "std": std, "scores": [float(s) for s in scores]}
