"""Fine-tuning a body with a fresh head: the recipe (AdamW, linear warm-up and decay, weight
decay off for LayerNorm and biases), the train and eval steps, early stopping on dev.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Optional

from absl import logging
import numpy as np
import tensorflow as tf
import tf_keras as keras

from cold_fusion_tf import inputs
from cold_fusion_tf import metrics as metrics_lib
from cold_fusion_tf import models
from cold_fusion_tf.data import TaskData
from cold_fusion_tf.errors import UserError

NO_DECAY = ("LayerNorm", "layer_norm", "bias")


def linear_schedule_value(step: float, peak: float, warmup_steps: int, total_steps: int) -> float:
  """Learning rate at ``step``: linear warm-up to ``peak``, then linear decay to 0."""
  if warmup_steps > 0 and step < warmup_steps:
    return peak * step / warmup_steps
  return peak * max(0.0, total_steps - step) / max(1, total_steps - warmup_steps)


class LinearWarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
  """The graph version of :func:`linear_schedule_value`."""

  def __init__(self, peak: float, warmup_steps: int, total_steps: int):
    self.peak, self.warmup_steps, self.total_steps = peak, warmup_steps, total_steps

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    warm = self.peak * step / max(1, self.warmup_steps)
    decay = self.peak * tf.maximum(0.0, self.total_steps - step) / max(
        1, self.total_steps - self.warmup_steps)
    return tf.where(step < self.warmup_steps, warm, decay)

  def get_config(self):
    return {"peak": self.peak, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}


def make_optimizer(recipe, total_steps: int):
  """AdamW with the linear schedule; no weight decay on LayerNorm weights and biases."""
  warmup = int(math.ceil(recipe.warmup_fraction * total_steps))
  optimizer = keras.optimizers.AdamW(
      learning_rate=LinearWarmupDecay(recipe.learning_rate, warmup, total_steps),
      weight_decay=recipe.weight_decay, beta_1=0.9, beta_2=0.999, epsilon=recipe.adam_epsilon,
      clipnorm=recipe.get("clip_norm") or None)
  optimizer.exclude_from_weight_decay(var_names=list(NO_DECAY))
  return optimizer


@dataclasses.dataclass
class FinetuneResult:
  dev: dict[str, float]            # metrics of the restored (best) model on dev
  test: Optional[dict[str, float]]  # metrics on test, if asked for
  steps: int
  best_step: int
  examples_seen: int
  seconds: float
  history: list[dict]


def finetune(body, tokenizer, task: TaskData, recipe, *, strategy=None, evaluate_test=False,
             log: Callable[[str], None] = logging.info, label: str = "") -> FinetuneResult:
  """Fine-tunes ``body`` (in place) with a fresh head on ``task``; returns its metrics.

  The best weights on dev (checked every ``recipe.eval_every_steps`` steps and at the end)
  are restored before returning, so the body left behind is the one that did best.
  """
  strategy = strategy or tf.distribute.get_strategy()
  input_names = models.body_input_names(body)
  max_length = min(recipe.max_length, body.config.max_position_embeddings - 2
                   if body.config.model_type in ("roberta", "xlm-roberta")
                   else body.config.max_position_embeddings)
  buckets = inputs.bucket_lengths(max_length)
  encoded = {s: inputs.encode(tokenizer, task.splits[s], max_length)
             for s in (("train", "dev", "test") if evaluate_test else ("train", "dev"))}
  train = encoded["train"]
  if len(train) < recipe.batch_size:
    raise UserError(f"{task.name}: {len(train)} training examples, fewer than one batch of "
                    f"{recipe.batch_size}; lower --config.recipe.batch_size.")
  steps_per_epoch = len(inputs.plan_batches(train.lengths, recipe.batch_size, shuffle=False,
                                            seed=0, drop_remainder=True))
  total_steps = int(recipe.epochs * steps_per_epoch)
  if recipe.max_steps:
    total_steps = min(total_steps, recipe.max_steps)
  total_steps = max(total_steps, 1)
  eval_every = recipe.eval_every_steps or steps_per_epoch
  label_dtype = tf.float32 if task.kind == "regression" else tf.int32

  with strategy.scope():
    model = models.TaskModel(body, task.num_outputs)
    optimizer = make_optimizer(recipe, total_steps)
  sample, _ = inputs.pad_batch(train, np.arange(min(2, len(train))), buckets, input_names)
  model(sample, training=False)
  variables = [v for v in model.trainable_variables if "pooler" not in v.name]

  def loss_fn(labels, outputs):
    if task.kind == "regression":
      return tf.square(tf.reshape(outputs, [-1]) - labels)
    return keras.losses.sparse_categorical_crossentropy(labels, outputs, from_logits=True)

  @tf.function(jit_compile=bool(recipe.get("jit_compile", False)))
  def step_fn(features, labels):
    with tf.GradientTape() as tape:
      outputs = model(features, training=True)
      loss = tf.nn.compute_average_loss(loss_fn(labels, outputs))
    grads = tape.gradient(loss, variables)
    optimizer.apply_gradients(zip(grads, variables))
    return loss

  @tf.function
  def train_step(features, labels):
    per_replica = strategy.run(step_fn, args=(features, labels))
    return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

  @tf.function
  def predict_step(features):
    return model(features, training=False)

  def evaluate(split_name):
    enc = encoded[split_name]
    batches = inputs.plan_batches(enc.lengths, recipe.eval_batch_size, shuffle=False, seed=0)
    outputs = np.zeros((len(enc), task.num_outputs), dtype=np.float32)
    for index in batches:
      features, _ = inputs.pad_batch(enc, index, buckets, input_names)
      outputs[index] = predict_step(features).numpy()
    return metrics_lib.task_metrics(task.kind, enc.labels, outputs)

  best = {"score": -math.inf, "step": 0, "weights": None, "metrics": None}
  history = []
  evals_without_gain = 0
  step = examples = 0
  start = last_log = time.time()
  epoch = 0
  log(f"{label}training {task.name}: {len(train)} examples, {total_steps} steps of "
      f"{recipe.batch_size}, lr {recipe.learning_rate:g}")
  stop = False
  while step < total_steps and not stop:
    batches = inputs.plan_batches(train.lengths, recipe.batch_size, shuffle=True,
                                  seed=recipe.seed + 1000 * epoch, drop_remainder=True)
    dataset = inputs.make_dataset(train, batches, buckets, input_names, label_dtype)
    for features, labels in strategy.experimental_distribute_dataset(dataset):
      loss = float(train_step(features, labels))
      if not math.isfinite(loss):
        raise UserError(f"{task.name}: the training loss became {loss} at step {step + 1}; "
                        "lower --config.recipe.learning_rate.")
      step += 1
      examples += recipe.batch_size
      now = time.time()
      if now - last_log > recipe.get("log_every_seconds", 30) or step == total_steps:
        rate = examples / (now - start)
        eta = (total_steps - step) * recipe.batch_size / max(rate, 1e-9)
        log(f"{label}{task.name} step {step}/{total_steps} loss {loss:.4f} "
            f"{rate:.1f} examples/s ETA {eta:.0f}s")
        last_log = now
      if step % eval_every == 0 or step == total_steps:
        dev = evaluate("dev")
        history.append({"step": step, "loss": loss, **{f"dev_{k}": v for k, v in dev.items()}})
        if dev["score"] > best["score"]:
          best = {"score": dev["score"], "step": step, "metrics": dev,
                  "weights": [w.numpy() for w in model.weights]}
          evals_without_gain = 0
        else:
          evals_without_gain += 1
          if recipe.get("patience_evals") and evals_without_gain >= recipe.patience_evals:
            log(f"{label}{task.name}: early stop at step {step} (best step {best['step']})")
            stop = True
            break
      if step >= total_steps:
        break
    epoch += 1
  if best["weights"] is not None and best["step"] != step:
    for w, value in zip(model.weights, best["weights"]):
      w.assign(value)
  test = evaluate("test") if evaluate_test else None
  return FinetuneResult(best["metrics"], test, step, best["step"], examples,
                        time.time() - start, history)
