"""Model recycling: how good a base is as a starting point.

For each target task and seed, the base is fine-tuned with a fresh head (same recipe and
seeds for every base), the best dev checkpoint is kept, and its test score is recorded:
accuracy, or Spearman correlation for regression tasks.

Two modes:

* ``finetune``: the whole model is trained (the paper's main protocol);
* ``probe``: the body is frozen (no dropout, no updates) and only the fresh head is trained,
  at ``eval_config.probe_learning_rate`` (the paper's "ColD-Frozen" linear probing).
"""

from __future__ import annotations

import gc
import os
from typing import Callable

from absl import logging
import tf_keras as keras

from cold_fusion_tf.model import bodies as models
from cold_fusion_tf.training import trainer as training
from cold_fusion_tf.training.recipe import Recipe
from cold_fusion_tf.tensors import safetensors_io as weights
from cold_fusion_tf.model import hf_names
from cold_fusion_tf.data import TaskData
from cold_fusion_tf.errors import UserError

MODES = ("finetune", "probe")
DEFAULT_PROBE_LEARNING_RATE = 1e-3
_DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout",
                   "attention_dropout")


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


def load_eval_body(base_dir: str, mode: str = "finetune"):
  """The body to fine-tune; for ``probe`` a frozen copy with every dropout rate set to 0."""
  if check_mode(mode) == "finetune":
    return models.load_body(base_dir)
  config = models.read_config(base_dir)
  for field in _DROPOUT_FIELDS:
    if hasattr(config, field):
      setattr(config, field, 0.0)
  body = models.build_body(config)
  path = os.path.join(base_dir, "model.safetensors")
  if not os.path.exists(path):
    raise UserError(f"{base_dir}: missing model.safetensors.")
  hf_names.assign_body_tensors(body, weights.load_checked(path, hf_names.expected_specs(body), path),
                              path)
  body.trainable = False
  return body


def finetune_once(base_dir: str, tokenizer, task: TaskData, eval_config, seed_index: int,
                  mode: str = "finetune", log: Callable[[str], None] = logging.info,
                  label: str = "") -> training.FinetuneResult:
  """One recycling run: fresh head, ``recipe_for(eval_config, mode, seed_index)``, test scored."""
  recipe = recipe_for(eval_config, mode, seed_index)
  models.set_seed(recipe.seed)
  body = load_eval_body(base_dir, mode)
  try:
    return training.finetune(body, tokenizer, task, recipe, evaluate_test=True, log=log,
                             label=label)
  finally:
    del body
    keras.backend.clear_session()
    gc.collect()
