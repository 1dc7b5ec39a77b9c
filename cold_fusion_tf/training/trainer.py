"""Fine-tuning a body with a fresh head, under any ``tf.distribute`` strategy.

The recipe is the paper's: AdamW, linear warm-up and decay, weight decay off for LayerNorm
weights and biases, global gradient clipping, evaluation on dev every N examples, early
stopping with patience, the best dev weights restored at the end.

How it runs:

* the model, optimizer and a copy of the best weights are created inside
  ``strategy.scope()``; the global batch is split across replicas (and, with gradient
  accumulation, into micro-batches) and the loss is the sum over the global batch divided by
  its size, so gradients mean the same whatever the split;
* ``steps_per_execution`` optimizer steps run inside one ``tf.function`` (a ``tf.range``
  loop over a distributed iterator): no Python per step, the loss is read back only when it
  is logged;
* with ``workdir`` the training state is checkpointed every ``checkpoint_every_steps`` steps
  and a rerun resumes from it (:mod:`cold_fusion_tf.training.checkpoints`); TensorBoard scalars
  (loss, learning rate, examples/s, dev metrics) go to ``<workdir>/tensorboard``.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable

from absl import logging
import numpy as np
import tensorflow as tf
import tf_keras as keras

from cold_fusion_tf import progress
from cold_fusion_tf.training import checkpoints as checkpointing
from cold_fusion_tf.training.common import (  # pylint: disable=unused-import
    FinetuneResult, duration_text, linear_schedule_value, plan_steps)
from cold_fusion_tf.training import inputs
from cold_fusion_tf.training import metrics as metrics_lib
from cold_fusion_tf.training.recipe import Recipe
from cold_fusion_tf.model import bodies as models
from cold_fusion_tf.training import distribute as strategies
from cold_fusion_tf.data import TaskData
from cold_fusion_tf.errors import UserError

NO_DECAY = ("LayerNorm", "layer_norm", "bias")
PRECISIONS = ("", "float32", "mixed_bfloat16", "mixed_float16")


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


def make_optimizer(recipe: Recipe, total_steps: int):
  """AdamW with the linear schedule; no weight decay on LayerNorm weights and biases.

  Gradients are clipped by their global norm after they are summed over replicas.
  """
  warmup = int(math.ceil(recipe.warmup_fraction * total_steps))
  optimizer = keras.optimizers.AdamW(
      learning_rate=LinearWarmupDecay(recipe.learning_rate, warmup, total_steps),
      weight_decay=recipe.weight_decay, beta_1=0.9, beta_2=0.999, epsilon=recipe.adam_epsilon,
      global_clipnorm=recipe.clip_norm or None)
  optimizer.exclude_from_weight_decay(var_names=list(NO_DECAY))
  return optimizer


@contextlib.contextmanager
def precision(policy: str):
  """Keras layers built inside use ``policy`` (e.g. ``mixed_bfloat16``); '' keeps float32."""
  if policy not in PRECISIONS:
    raise UserError(f"--config.recipe.mixed_precision={policy!r} is not one of "
                    f"{', '.join(repr(p) for p in PRECISIONS)}.")
  if not policy or policy == "float32":
    yield
    return
  previous = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy(policy)
  try:
    yield
  finally:
    keras.mixed_precision.set_global_policy(previous)


def max_length_for(body, recipe: Recipe) -> int:
  config = body.config
  limit = config.max_position_embeddings
  if config.model_type in ("roberta", "xlm-roberta"):
    limit -= 2
  return min(recipe.max_length, limit)


def finetune(body, tokenizer, task: TaskData, recipe: Recipe, *, strategy=None, evaluate_test=False,
             log: Callable[[str], None] = logging.info, label: str = "",
             workdir: str | None = None, run_key: str = "") -> FinetuneResult:
  """Fine-tunes ``body`` (in place) with a fresh head on ``task``; returns its metrics.

  The best weights on dev (checked every ``eval_every_examples`` / ``eval_every_steps``
  steps, or once per epoch, and at the end) are restored before returning, so the body left
  behind is the one that did best. With ``workdir``, training resumes from the checkpoint
  found there (``run_key`` is part of the run's fingerprint, e.g. the base's sha256).
  """
  return _Trainer(body, tokenizer, task, recipe, strategy or tf.distribute.get_strategy(),
                  log, label, workdir, run_key).run(evaluate_test)


def throughput(body, tokenizer, task: TaskData, recipe: Recipe, *, steps: int, warmup_steps: int = 2,
               strategy=None) -> dict:
  """Times ``steps`` training steps of the contributor loop (after ``warmup_steps`` that
  trace and warm up), on the first epoch's planned batches; no evaluation, no checkpoints.

  Returns examples, seconds, and the real and padded token counts of the timed steps (and
  the sequence lengths, for FLOP estimates).
  """
  recipe = recipe.replace(checkpoint_every_steps=0)
  trainer = _Trainer(body, tokenizer, task, recipe, strategy or tf.distribute.get_strategy(),
                     lambda message: None, "", None, "")
  train = trainer.encoded["train"]
  plan = inputs.plan_epoch(train.lengths, trainer.global_batch, trainer.buckets,
                           seed=recipe.seed, static_shapes=trainer.static,
                           steps_per_execution=trainer.per_execution)
  if len(plan) < warmup_steps + steps:
    raise UserError(f"{task.name}: one epoch has {len(plan)} steps; fewer than "
                    f"{warmup_steps + steps} asked for.")
  if trainer.static:
    raise UserError("throughput() measures dynamic shapes; static shapes are for TPUs.")
  iterator = iter(trainer.distribute(train, plan, np.arange(warmup_steps + steps)))
  done = 0
  while done < warmup_steps:
    n = min(trainer.per_execution, warmup_steps - done)
    float(trainer.train_chunk(iterator, tf.constant(n, tf.int32)))
    done += n
  start = time.perf_counter()
  losses = []
  while done < warmup_steps + steps:
    n = min(trainer.per_execution, warmup_steps + steps - done)
    losses.append(trainer.train_chunk(iterator, tf.constant(n, tf.int32)))
    done += n
  loss = sum(float(x) for x in losses)
  seconds = time.perf_counter() - start
  timed = plan.batches[warmup_steps:warmup_steps + steps]
  widths = plan.widths[warmup_steps:warmup_steps + steps]
  return {"examples": int(timed.size), "seconds": seconds,
          "real_tokens": int(train.lengths[timed].sum()),
          "padded_tokens": int((widths * timed.shape[1]).sum()),
          "lengths": train.lengths[timed].reshape(-1).tolist(), "widths": widths.tolist(),
          "batch_size": int(timed.shape[1]), "mean_loss": loss / steps}


class _Trainer:
  """One fine-tuning run (see :func:`finetune`)."""

  def __init__(self, body, tokenizer, task, recipe, strategy, log, label, workdir, run_key):
    self.task, self.recipe, self.strategy = task, recipe, strategy
    self.log, self.label, self.workdir = log, label, workdir
    self.chief = strategies.is_chief(strategy)
    if not self.chief:
      task_type, task_id = strategies.task(strategy)
      self.label = f"{label}[{task_type} {task_id}] "
    self.original_body = body
    self.input_names = models.body_input_names(body)
    self.static = recipe.static_shapes or strategies.is_tpu(strategy)
    self.per_execution = recipe.steps_per_execution
    self.replicas = strategy.num_replicas_in_sync
    self.accumulation, self.micro = strategies.check_recipe_batch(recipe, strategy)
    self.global_batch = recipe.batch_size
    self.eval_batch = -(-recipe.eval_batch_size // self.replicas) * self.replicas
    self.label_dtype = tf.float32 if task.kind == "regression" else tf.int32

    max_length = max_length_for(body, recipe)
    cache = checkpointing.join(workdir, "tokens") if workdir else None
    self.tokenize = lambda split: inputs.encode(tokenizer, task.splits[split], max_length, cache)
    self.encoded = {s: self.tokenize(s) for s in ("train", "dev")}
    train = self.encoded["train"]
    num_buckets = recipe.length_buckets or (8 if self.static else 0)
    # Static shapes and GPUs want lengths in multiples of 8; a CPU's cost is linear in the
    # length, so there a batch is padded only to its longest example.
    on_gpu = strategies.uses_gpu(strategy)
    multiple = 8 if self.static or on_gpu else 1
    self.buckets = inputs.bucket_lengths(max_length, train.lengths, num_buckets, multiple)
    steps = plan_steps(recipe, task.name, len(train), self.replicas, self.accumulation)
    self.global_batch, self.micro, self.notes = steps.global_batch, steps.micro, steps.notes
    self.steps_per_epoch, self.total_steps = steps.steps_per_epoch, steps.total_steps
    self.eval_every = steps.eval_every
    self.checkpoint_every = recipe.checkpoint_every_steps
    self.fingerprint = {
        "task": task.name, "train_examples": len(train), "kind": task.kind,
        "num_outputs": task.num_outputs, "batch_size": self.global_batch,
        "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
        "seed": recipe.seed, "learning_rate": recipe.learning_rate,
        "max_length": max_length, "static_shapes": self.static, "run_key": run_key}
    if self.static:  # then the batch order also depends on these
      self.fingerprint.update(buckets=self.buckets, steps_per_execution=self.per_execution)
    self._build(body)

  # ------------------------------------------------------------------------------------------
  # Model, optimizer, step functions

  def _build(self, body) -> None:
    recipe, strategy = self.recipe, self.strategy
    policy = recipe.mixed_precision
    with precision(policy), strategy.scope():
      self.body = self._body_in_scope(body, policy)
      self.model = models.TaskModel(self.body, self.task.num_outputs)
      self.model.head(tf.zeros([1, 1, self.body.config.hidden_size]))
      self.variables = [v for v in self.model.trainable_variables if "pooler" not in v.name]
      self.optimizer = make_optimizer(recipe, self.total_steps)
      self.optimizer.build(self.variables)
      self.best_weights = [tf.Variable(v, trainable=False, name="best") for v in self.model.weights]
    self.checkpoints = None
    if self.workdir and self.checkpoint_every:
      self.checkpoints = checkpointing.Checkpoints(
          self.workdir, strategy, self.fingerprint, model=self.model, optimizer=self.optimizer,
          best=self.best_weights)
    self.train_chunk = self._make_train_chunk()
    self.predict_step = self._make_predict_step()

  def _body_in_scope(self, body, policy: str):
    """``body`` if its variables belong to the strategy and precision; else a copy that does."""
    in_scope = all(self.strategy.extended.variable_created_in_scope(v) for v in body.weights[:1])
    wanted = keras.mixed_precision.Policy(policy or "float32").compute_dtype
    if in_scope and body.compute_dtype == wanted:
      return body
    fresh = models.build_body(body.config)
    for target, source in zip(fresh.weights, body.weights):
      target.assign(source.numpy())
    fresh.trainable = body.trainable  # a frozen body (linear probing) stays frozen
    return fresh

  def _loss(self, labels, outputs):
    if self.task.kind == "regression":
      return tf.square(tf.reshape(outputs, [-1]) - labels)
    return keras.losses.sparse_categorical_crossentropy(labels, outputs, from_logits=True)

  def _make_train_chunk(self):
    model, optimizer, variables = self.model, self.optimizer, self.variables
    strategy, accumulation, micro = self.strategy, self.accumulation, self.micro
    global_batch = self.global_batch
    dense = self.replicas > 1 or accumulation > 1

    def gradients(features, labels):
      with tf.GradientTape() as tape:
        outputs = tf.cast(model(features, training=True), tf.float32)
        loss = tf.nn.compute_average_loss(self._loss(labels, outputs),
                                          global_batch_size=global_batch)
      grads = tape.gradient(loss, variables)
      grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables)]
      if dense:  # sparse (IndexedSlices) all-reduces inside a step loop can go out of step
        grads = [tf.convert_to_tensor(g) for g in grads]
      return grads, loss

    if self.recipe.jit_compile:
      gradients = tf.function(gradients, jit_compile=True, autograph=False)

    def replica_step(features, labels):
      if accumulation == 1:
        grads, loss = gradients(features, labels)
      else:
        split = {k: tf.reshape(v, tf.concat([[accumulation, micro], tf.shape(v)[1:]], 0))
                 for k, v in features.items()}
        split_labels = tf.reshape(labels, [accumulation, micro])

        def body(i, loss, *acc):
          grads, part = gradients({k: v[i] for k, v in split.items()}, split_labels[i])
          return (i + 1, loss + part, *[a + tf.convert_to_tensor(g) for a, g in zip(acc, grads)])

        zeros = [tf.zeros_like(v) for v in variables]
        _, loss, *grads = tf.while_loop(lambda i, *_: i < accumulation, body,
                                        (tf.constant(0), tf.constant(0.0), *zeros),
                                        parallel_iterations=1)
      optimizer.apply_gradients(zip(grads, variables))
      return loss

    # AutoGraph would convert the whole model's Python code on every trace (seconds per
    # run); the loops here are explicit, so it is off.
    @tf.function(autograph=False)
    def train_chunk(iterator, steps):
      def one_step(i, total):
        features, labels = next(iterator)
        per_replica = strategy.run(replica_step, args=(features, labels))
        return i + 1, total + strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

      _, total = tf.while_loop(lambda i, _: i < steps, one_step,
                               (tf.constant(0), tf.constant(0.0)))
      return total

    return train_chunk

  def _make_predict_step(self):
    model, strategy = self.model, self.strategy

    def replica_predict(features):
      return tf.cast(model(features, training=False), tf.float32), features["index"]

    @tf.function(autograph=False)
    def predict_step(iterator):
      features, _ = next(iterator)
      outputs, index = strategy.run(replica_predict, args=(features,))
      return strategy.gather(outputs, axis=0), strategy.gather(index, axis=0)

    return predict_step

  # ------------------------------------------------------------------------------------------
  # Data

  def distribute(self, encoded, plan, steps, *, with_index=False):
    """The distributed dataset of ``steps`` of ``plan`` (padded to their group's width when
    shapes are static)."""
    width = int(plan.widths[steps[0]]) if self.static else None
    fn = inputs.replica_dataset_fn(encoded, plan, steps, self.input_names, self.label_dtype,
                                   width=width, with_index=with_index)
    return self.strategy.distribute_datasets_from_function(fn)

  def evaluate(self, split: str) -> dict[str, float]:
    if split not in self.encoded:
      self.encoded[split] = self.tokenize(split)
    encoded = self.encoded[split]
    if not hasattr(self, "_eval_sets"):
      self._eval_sets = {}
    if split not in self._eval_sets:
      plan = inputs.eval_plan(encoded.lengths, self.eval_batch, self.buckets, self.static)
      sets = []
      for group in np.unique(plan.groups):
        steps = np.flatnonzero(plan.groups == group)
        sets.append((self.distribute(encoded, plan, steps, with_index=True), len(steps)))
      self._eval_sets[split] = sets
    outputs = np.zeros((len(encoded), self.task.num_outputs), dtype=np.float32)
    for dataset, count in self._eval_sets[split]:
      iterator = iter(dataset)
      for _ in range(count):
        out, index = self.predict_step(iterator)
        out, index = out.numpy(), index.numpy()
        keep = index >= 0
        outputs[index[keep]] = out[keep]
    return metrics_lib.task_metrics(self.task.kind, encoded.labels, outputs)

  # ------------------------------------------------------------------------------------------
  # The loop

  def run(self, evaluate_test: bool) -> FinetuneResult:
    recipe, task, log, label = self.recipe, self.task, self.log, self.label
    state = {"best_score": None, "best_step": 0, "best_metrics": None, "evals_without_gain": 0,
             "history": [], "stopped": False, "train_seconds": 0.0}
    resumed_from = 0
    if self.checkpoints is not None:
      saved = self.checkpoints.restore()
      if saved is not None:
        state.update({k: saved[k] for k in state if k in saved})
        resumed_from = int(saved["step"])
    step = int(self.optimizer.iterations.numpy())
    if resumed_from != step:
      raise UserError(f"{self.checkpoints.latest()}: its optimizer is at step {step} but its "
                      f"record says {resumed_from}; delete {self.checkpoints.directory}.")
    self._agree_on_step(step)
    log(f"{label}training {task.name}: {len(self.encoded['train'])} examples, "
        f"{self.total_steps} steps of {self.global_batch} "
        f"({self.micro} per replica x {self.replicas} replica(s) x {self.accumulation} "
        f"accumulation), lr {recipe.learning_rate:g}, {strategies.describe(self.strategy)}")
    for note in self.notes:
      log(f"{label}{note}")
    if resumed_from:
      log(f"{label}{task.name}: resuming from step {resumed_from} "
          f"({self.checkpoints.latest()})")

    writer = None
    if self.workdir and self.chief:
      writer = tf.summary.create_file_writer(checkpointing.join(self.workdir, "tensorboard"))
    self._session = {"start": time.time(), "steps": 0, "other_seconds": 0.0}
    pending_loss, pending_steps = [], 0
    last_log = time.time()
    log_every_steps = recipe.log_every_steps
    while step < self.total_steps and not state["stopped"]:
      epoch, offset = divmod(step, self.steps_per_epoch)
      plan = inputs.plan_epoch(self.encoded["train"].lengths, self.global_batch, self.buckets,
                               seed=recipe.seed + 1000 * epoch, static_shapes=self.static,
                               steps_per_execution=self.per_execution)
      iterators = {}
      while offset < len(plan) and step < self.total_steps and not state["stopped"]:
        group = int(plan.groups[offset])
        if group not in iterators:  # this epoch's remaining steps of this group, in order
          steps = np.flatnonzero(plan.groups[offset:] == group) + offset
          iterators[group] = iter(self.distribute(self.encoded["train"], plan, steps))
        n = min(plan.run_end(offset) - offset, self.per_execution, self.total_steps - step,
                self._to_next(step, self.eval_every), self._to_next(step, self.checkpoint_every),
                self._to_next(step, log_every_steps))
        pending_loss.append(self.train_chunk(iterators[group], tf.constant(n, tf.int32)))
        step, offset, pending_steps = step + n, offset + n, pending_steps + n
        self._session["steps"] += n
        is_eval = step % self.eval_every == 0 or step == self.total_steps
        is_log = (is_eval or time.time() - last_log >= recipe.log_every_seconds
                  or (log_every_steps and step % log_every_steps == 0))
        if is_log:  # the only place the loss is read back from the device
          loss = sum(float(x) for x in pending_loss) / pending_steps
          if not math.isfinite(loss):
            raise UserError(f"{task.name}: the training loss became {loss} by step {step}; "
                            "lower --config.recipe.learning_rate.")
          self._log_progress(step, loss, writer)
          pending_loss, pending_steps, last_log = [], 0, time.time()
        elif progress.live(log):  # a terminal: the status line after every call
          self._log_progress(step, None, None)
        t0 = time.time()
        if is_eval:
          self._evaluate_and_track(step, loss, state, writer)
        if self.checkpoints is not None and (step % self.checkpoint_every == 0
                                             or state["stopped"] or step == self.total_steps):
          self.checkpoints.save(step, {**state, "step": step,
                                       "train_seconds": state["train_seconds"] + self._seconds()})
          if self.chief:
            log(f"{label}{task.name}: saved checkpoint at step {step}")
        self._session["other_seconds"] += time.time() - t0

    if state["best_score"] is not None and state["best_step"] != step:
      self._copy(self.best_weights, self.model.weights)
    if self.body is not self.original_body:
      for target, source in zip(self.original_body.weights, self.body.weights):
        target.assign(source.numpy())
    test = self.evaluate("test") if evaluate_test else None
    if writer is not None:
      writer.flush()
    seconds = state["train_seconds"] + time.time() - self._session["start"]
    return FinetuneResult(state["best_metrics"], test, step, state["best_step"],
                          step * self.global_batch, seconds, state["history"], resumed_from)

  @staticmethod
  def _to_next(step: int, period: int) -> int:
    """Steps from ``step`` to the next multiple of ``period`` (large when period is 0)."""
    if not period:
      return 1 << 30
    return period - step % period

  def _agree_on_step(self, step: int) -> None:
    """In a cluster, every worker must start from the same step (a shared workdir)."""
    if not strategies.is_multi_worker(self.strategy):
      return
    value = tf.constant([step], tf.int64)
    steps = self.strategy.gather(self.strategy.run(lambda: tf.identity(value)), axis=0).numpy()
    low, high = int(steps.min()), int(steps.max())
    if high != low:
      raise UserError(f"workers restored different steps ({low}..{high}): the "
                      "--workdir must be one folder every worker can read (e.g. gs://...).")

  def _seconds(self) -> float:
    """Wall time of this session so far."""
    return time.time() - self._session["start"]

  def _log_progress(self, step, loss, writer) -> None:
    busy = self._seconds() - self._session["other_seconds"]  # training only, not dev/saving
    rate = self._session["steps"] * self.global_batch / max(busy, 1e-9)
    eta = (self.total_steps - step) * self.global_batch / max(rate, 1e-9)
    recipe = self.recipe
    lr = linear_schedule_value(step, recipe.learning_rate,
                               int(math.ceil(recipe.warmup_fraction * self.total_steps)),
                               self.total_steps)
    shown = "" if loss is None else f"loss {loss:.4f} "  # None: not read back this time
    self.log(progress.Status(
        f"{self.label}{self.task.name} {progress.bar(step, self.total_steps)} step {step}/"
        f"{self.total_steps} {shown}lr {lr:.3g} {rate:.1f} examples/s ETA {duration_text(eta)}",
        final=step >= self.total_steps))
    if writer is not None and loss is not None:
      with writer.as_default(step=step):
        tf.summary.scalar("train/loss", loss)
        tf.summary.scalar("train/learning_rate", lr)
        tf.summary.scalar("train/examples_per_second", rate)

  def _evaluate_and_track(self, step, loss, state, writer) -> None:
    dev = self.evaluate("dev")
    state["history"].append({"step": step, "loss": loss, **{f"dev_{k}": v for k, v in dev.items()}})
    if writer is not None:
      with writer.as_default(step=step):
        for key, value in dev.items():
          tf.summary.scalar(f"dev/{key}", value)
    if state["best_score"] is None or dev["score"] > state["best_score"]:
      state.update(best_score=dev["score"], best_step=step, best_metrics=dev,
                   evals_without_gain=0)
      self._copy(self.model.weights, self.best_weights)
      return
    state["evals_without_gain"] += 1
    recipe = self.recipe
    patience_examples = recipe.patience_examples
    if patience_examples:
      stop = (step - state["best_step"]) * self.global_batch >= patience_examples
    else:
      patience = recipe.patience_evals
      stop = bool(patience) and state["evals_without_gain"] >= patience
    if stop:
      self.log(f"{self.label}{self.task.name}: early stop at step {step} "
               f"(best step {state['best_step']})")
      state["stopped"] = True

  @staticmethod
  def _copy(source, target) -> None:
    for s, t in zip(source, target):
      t.assign(s)

