"""What both trainers share (transformers-TF and Keras 3): the batches and steps of a
fine-tune, the learning rate of the paper's schedule at a step, the result of a fine-tune,
and the duration format of progress lines.

It imports no model framework, so the Keras 3 trainer can use it without tf-keras.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from cold_fusion_tf.errors import UserError


@dataclasses.dataclass
class Steps:
  """How a fine-tune is cut into steps."""
  global_batch: int      # examples per optimizer step, over all replicas and micro-batches
  micro: int             # examples per replica per micro-batch
  steps_per_epoch: int
  total_steps: int
  eval_every: int        # optimizer steps between dev evaluations
  notes: list[str]       # what differs from the recipe, for the log


FINGERPRINT_FIELDS = ("warmup_fraction", "weight_decay", "adam_epsilon", "clip_norm",
                    "mixed_precision", "patience_evals", "patience_examples")
"""Recipe fields that change a run's updates or its best step beyond its steps and batch: part
of a checkpoint's fingerprint, so a run resumed with another of them is refused."""


def recipe_fingerprint(recipe) -> dict:
  """The :data:`FINGERPRINT_FIELDS` of ``recipe``."""
  return {name: getattr(recipe, name) for name in FINGERPRINT_FIELDS}


def plan_steps(recipe, task_name: str, train_examples: int, replicas: int,
               accumulation: int) -> Steps:
  """The batch, steps and evaluation period of a recipe on ``train_examples`` examples.

  A dataset smaller than one batch trains on one smaller batch per epoch (a multiple of the
  replicas x accumulation steps).
  """
  unit = replicas * accumulation
  global_batch, notes = recipe.batch_size, []
  if train_examples < global_batch:
    if train_examples < unit:
      raise UserError(f"{task_name}: {train_examples} training examples, fewer than the {unit} "
                      "replicas x accumulation steps of one batch.")
    global_batch = train_examples // unit * unit
    notes.append(f"{task_name}: {train_examples} training examples, fewer than one batch of "
                 f"{recipe.batch_size}: batches of {global_batch} instead")
  steps_per_epoch = train_examples // global_batch
  total = int(recipe.epochs * steps_per_epoch)
  if recipe.max_steps:
    total = min(total, recipe.max_steps)
  if recipe.eval_every_examples:
    eval_every = max(1, int(round(recipe.eval_every_examples / global_batch)))
  else:
    eval_every = recipe.eval_every_steps or steps_per_epoch
  if total <= 1 and recipe.warmup_fraction > 0:
    raise UserError(
        f"{task_name}: the recipe makes one training step ({train_examples} examples, batches of "
        f"{global_batch}, {recipe.epochs:g} epoch(s), max_steps {recipe.max_steps}), and its "
        f"warm-up (warmup_fraction {recipe.warmup_fraction:g}, at least one step) gives that "
        "step a learning rate of 0: nothing would be learned. Train longer (more examples, "
        "epochs or max_steps, or a smaller batch_size), or set warmup_fraction=0.")
  return Steps(global_batch, global_batch // unit, steps_per_epoch, max(total, 1), eval_every,
               notes)


def linear_schedule_value(step: float, peak: float, warmup_steps: int, total_steps: int) -> float:
  """Learning rate at ``step``: linear warm-up to ``peak``, then linear decay to 0."""
  if warmup_steps > 0 and step < warmup_steps:
    return peak * step / warmup_steps
  return peak * max(0.0, total_steps - step) / max(1, total_steps - warmup_steps)


@dataclasses.dataclass
class FinetuneResult:
  dev: dict[str, float]            # metrics of the restored (best) model on dev
  test: Optional[dict[str, float]]  # metrics on test, if asked for
  steps: int
  best_step: int
  examples_seen: int
  seconds: float
  history: list[dict]
  resumed_from: int = 0            # the step a checkpoint was restored at (0: a fresh start)
  timings: dict = dataclasses.field(default_factory=dict)  # seconds by phase (training.timings)


def duration_text(seconds: float) -> str:
  """``75`` -> ``1m15s``: a short duration for progress lines."""
  seconds = int(round(seconds))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
