"""Model recycling: how good a base is as a starting point.

For each target task and seed, the base is fine-tuned with a fresh head (same recipe and
seeds for every base), the best dev checkpoint is kept, and its test score is recorded:
accuracy, or Spearman correlation for regression tasks.

Two modes:

* ``finetune``: the whole model is trained (the paper's main protocol);
* ``probe``: the body is frozen (no dropout, no updates) and only the fresh head is trained,
  at ``eval_config.probe_learning_rate`` (the paper's "ColD-Frozen" linear probing).

An evaluation runs many short fine-tunes in one process: each base's weights go from its file
straight into a model kept from an earlier run of the same shapes
(:mod:`cold_fusion_tf.training.model_cache`), and each dataset is tokenized once. A run's
result depends only on the base, the data, the recipe and the seed, not on what ran before.
"""

from __future__ import annotations

import os
from typing import Callable

from absl import logging

from cold_fusion_tf.model import bodies as models
from cold_fusion_tf.training import model_cache
from cold_fusion_tf.training import trainer as training
from cold_fusion_tf.training.recipe import Recipe
from cold_fusion_tf.tensors import safetensors_io as weights
from cold_fusion_tf.model import hf_names
from cold_fusion_tf.data import TaskData
from cold_fusion_tf.errors import UserError

MODES = ("finetune", "probe")
DEFAULT_PROBE_LEARNING_RATE = 1e-3


def check_mode(mode: str) -> str:
  if mode not in MODES:
    raise UserError(f"--mode={mode!r} is not one of {', '.join(MODES)}.")
  return mode


def recipe_for(eval_config, mode: str = "finetune", seed_index: int = 0):
  """The recipe of one evaluation run: ``eval_config.recipe`` with its seed shifted by
  ``seed_index`` and, for probes, the probe learning rate."""
  check_mode(mode)
  recipe = Recipe.from_config(eval_config.recipe, "config.eval.recipe")
  recipe = recipe.replace(seed=recipe.seed + int(seed_index))
  if mode == "probe":
    recipe = recipe.replace(learning_rate=float(eval_config.get("probe_learning_rate",
                                                                DEFAULT_PROBE_LEARNING_RATE)))
  return recipe


def eval_body_weights(base_dir: str, mode: str = "finetune") -> model_cache.BodyWeights:
  """The body a run starts from, without building one: the base's config (for ``probe``
  every dropout rate set to 0, and frozen) and its weights, checked as they are assigned."""
  config = models.read_config(base_dir)
  if check_mode(mode) == "probe":
    config = models.without_dropout(config)
  path = os.path.join(base_dir, "model.safetensors")
  if not os.path.exists(path):
    raise UserError(f"{base_dir}: missing model.safetensors.")

  def assign(body) -> None:
    tensors = weights.load_checked(path, hf_names.expected_specs(body), path)
    hf_names.assign_body_tensors(body, tensors, path)

  return model_cache.BodyWeights(config, assign, trainable=mode == "finetune")


def load_eval_body(base_dir: str, mode: str = "finetune"):
  """The body to fine-tune, built; for ``probe`` a frozen copy with every dropout rate 0."""
  start = eval_body_weights(base_dir, mode)
  body = models.build_body(start.config)
  start.assign(body)
  body.trainable = start.trainable
  return body


def finetune_once(base_dir: str, tokenizer, task: TaskData, eval_config, seed_index: int,
                  mode: str = "finetune", log: Callable[[str], None] = logging.info,
                  label: str = "") -> training.FinetuneResult:
  """One recycling run: fresh head, ``recipe_for(eval_config, mode, seed_index)``, test scored."""
  recipe = recipe_for(eval_config, mode, seed_index)
  return training.finetune(eval_body_weights(base_dir, mode), tokenizer, task, recipe,
                           evaluate_test=True, log=log, label=label)
