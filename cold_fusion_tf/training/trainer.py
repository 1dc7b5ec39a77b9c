"""Fine-tuning a body with a fresh head, under any ``tf.distribute`` strategy.

The recipe is the paper's: AdamW, linear warm-up and decay, weight decay off for LayerNorm
weights and biases, global gradient clipping (:mod:`~cold_fusion_tf.training.optimizer`),
evaluation on dev every N examples, early stopping with patience, the best dev weights
restored at the end.

How it runs:

* the model, optimizer and a copy of the best weights are created inside
  ``strategy.scope()``, and kept for the next fine-tune of the same shapes in the process
  (:mod:`~cold_fusion_tf.training.model_cache`: the body's weights are assigned, the head
  drawn from the seed, the optimizer reset), so a short fine-tune does not pay for building
  and tracing again;
* ``steps_per_execution`` optimizer steps run inside one ``tf.function``
  (:mod:`~cold_fusion_tf.training.steps`): no Python per step, the loss is read back only when
  it is logged;
* each split is tokenized once per process (and cached in ``<workdir>/tokens``);
* with ``workdir`` the training state is checkpointed every ``checkpoint_every_steps`` steps
  and a rerun resumes from it (:mod:`cold_fusion_tf.training.checkpoints`); a run no longer
  than one interval writes none. TensorBoard scalars (loss, learning rate, examples/s, dev
  metrics) go to ``<workdir>/tensorboard``;
* the result holds where the time went (:mod:`~cold_fusion_tf.training.timings`), and the
  last log line of a fine-tune shows it.
"""

from __future__ import annotations

import math
import time
from typing import Callable

from absl import logging
import numpy as np
import tensorflow as tf

from cold_fusion_tf import progress
from cold_fusion_tf.training import checkpoints as checkpointing
from cold_fusion_tf.training.common import (  # pylint: disable=unused-import
    FinetuneResult, duration_text, linear_schedule_value, plan_steps, recipe_fingerprint)
from cold_fusion_tf.training import inputs
from cold_fusion_tf.training import metrics as metrics_lib
from cold_fusion_tf.training import model_cache
from cold_fusion_tf.training import optimizer as optimizer_lib
from cold_fusion_tf.training import timings as timings_lib
from cold_fusion_tf.training.recipe import Recipe
from cold_fusion_tf.model import hf_config
from cold_fusion_tf.model import bodies as models
from cold_fusion_tf.training import distribute as strategies
from cold_fusion_tf.data import TaskData
from cold_fusion_tf.errors import UserError

# The optimizer and precision, for code that takes them from the trainer.
NO_DECAY, LinearWarmupDecay, make_optimizer = (optimizer_lib.NO_DECAY,
                                               optimizer_lib.LinearWarmupDecay,
                                               optimizer_lib.make_optimizer)
PRECISIONS, precision = model_cache.PRECISIONS, model_cache.precision


def max_length_for(body, recipe: Recipe) -> int:
  """The recipe's ``max_length``, at most what the body takes."""
  return min(recipe.max_length, hf_config.max_positions(body.config))


def finetune(body, tokenizer, task: TaskData, recipe: Recipe, *, strategy=None, evaluate_test=False,
             log: Callable[[str], None] = logging.info, label: str = "",
             workdir: str | None = None, run_key: str = "") -> FinetuneResult:
  """Fine-tunes ``body`` (in place) with a fresh head on ``task``; returns its metrics.

  ``body`` is a TF body, or a :class:`~cold_fusion_tf.training.model_cache.BodyWeights` when
  only the metrics are wanted (nothing is built for it; a kept model takes its weights). The
  best weights on dev (checked every ``eval_every_examples`` / ``eval_every_steps``
  steps, or once per epoch, and at the end) are restored before returning, so the body left
  behind is the one that did best. With ``workdir``, training resumes from the checkpoint
  found there (``run_key`` is part of the run's fingerprint, e.g. the base's sha256).
  """
  strategy = strategy or tf.distribute.get_strategy()
  head = None
  if recipe.probe_epochs and body.trainable:
    head = probe_head(body, tokenizer, task, recipe, strategy, log, label, workdir)
  return _Trainer(body, tokenizer, task, recipe, strategy, log, label, workdir, run_key,
                  head).run(evaluate_test)


def probe_head(body, tokenizer, task: TaskData, recipe: Recipe, strategy,
               log: Callable[[str], None] = logging.info, label: str = "",
               workdir: str | None = None) -> list:
  """The head of a fine-tune's probe phase (LP-FT): ``recipe.probe_epochs`` passes that
  train a fresh head on the frozen body (every dropout rate 0) at
  ``recipe.probe_learning_rate``, its best dev weights; the full fine-tune starts from them
  instead of a random head, so its first steps do not push the body with a random head's
  gradients. With ``workdir`` it shares the fine-tune's token cache (and writes nothing
  else there)."""
  if isinstance(body, model_cache.BodyWeights):
    assign = body.assign
  else:
    def assign(target):
      for t, s in zip(target.weights, body.weights):
        t.assign(s.numpy())
  frozen = model_cache.BodyWeights(models.without_dropout(body.config), assign, trainable=False)
  probe = recipe.replace(epochs=recipe.probe_epochs, learning_rate=recipe.probe_learning_rate,
                         max_steps=0, probe_epochs=0.0, checkpoint_every_steps=0)
  trainer = _Trainer(frozen, tokenizer, task, probe, strategy, log, f"{label}probe: ", None, "",
                     tokens=inputs.token_cache(workdir))
  trainer.run(False)
  return [w.numpy() for w in trainer.model.head.weights]


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

  def __init__(self, body, tokenizer, task, recipe, strategy, log, label, workdir, run_key,
               head=None, tokens=None):
    self.head = head  # the head to start from (a probe phase's), else drawn from the seed
    self.timings = timings_lib.Timings()
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
    self.label_dtype = tf.float32 if task.kind == "regression" else tf.int32

    max_length = max_length_for(body, recipe)
    cache = tokens or inputs.token_cache(workdir)

    def tokenize(split):
      with self.timings.phase("tokenize"):
        return inputs.encode(tokenizer, task.splits[split], max_length, cache)

    self.tokenize = tokenize
    self.encoded = inputs.start_splits(self.tokenize, task.kind)
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
    # Prediction batches are length-sorted and padded to their longest example; on a CPU,
    # where a batch costs its padded length, ones no larger than a training batch pad least.
    eval_batch = recipe.eval_batch_size
    if not (self.static or on_gpu):
      eval_batch = min(eval_batch, self.global_batch)
    self.eval_batch = -(-eval_batch // self.replicas) * self.replicas
    # A run no longer than one interval is cheaper to redo than to checkpoint.
    self.checkpoint_every = (recipe.checkpoint_every_steps
                             if self.total_steps > recipe.checkpoint_every_steps else 0)
    self.fingerprint = {
        "task": task.name, "train_examples": len(train), "kind": task.kind,
        "num_outputs": task.num_outputs, "batch_size": self.global_batch,
        "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
        "seed": recipe.seed, "learning_rate": recipe.learning_rate,
        "max_length": max_length, "static_shapes": self.static, "run_key": run_key,
        **recipe_fingerprint(recipe)}
    if recipe.probe_epochs:
      self.fingerprint.update(probe_epochs=recipe.probe_epochs,
                              probe_learning_rate=recipe.probe_learning_rate)
    if self.static:  # then the batch order also depends on these
      self.fingerprint.update(buckets=self.buckets, steps_per_execution=self.per_execution)
    self._build(body)

  # ------------------------------------------------------------------------------------------
  # Model, optimizer, step functions

  def _build(self, body) -> None:
    """The model, optimizer and step functions: kept from an earlier fine-tune of the same
    shapes, or built (see :mod:`~cold_fusion_tf.training.model_cache`)."""
    recipe = self.recipe
    shapes = model_cache.Shapes(self.task.num_outputs, self.task.kind, self.global_batch,
                                self.accumulation, self.micro)
    with self.timings.phase("build"):
      built, self.timings.reused = model_cache.get(body.config, body.trainable, shapes, recipe,
                                                   self.strategy)
      built.start(body, recipe.seed, recipe.learning_rate,
                  optimizer_lib.warmup_steps(recipe.warmup_fraction, self.total_steps),
                  self.total_steps, head=self.head)
    self.body, self.model, self.optimizer = built.body, built.model, built.optimizer
    self.best_weights = built.best_weights
    self.train_chunk, self.predict_step = built.train_chunk, built.predict_step
    self.checkpoints = None
    if self.workdir and self.checkpoint_every:
      self.checkpoints = checkpointing.Checkpoints(
          self.workdir, self.strategy, self.fingerprint, model=self.model,
          optimizer=self.optimizer, best=self.best_weights)

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
    with self.timings.phase(split if split in timings_lib.PHASES else "other"):
      return self._predict_and_score(split)

  def _predict_and_score(self, split: str) -> dict[str, float]:
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
      with self.timings.phase("checkpoints"):
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
          with self.timings.phase("input"):
            iterators[group] = iter(self.distribute(self.encoded["train"], plan, steps))
        n = min(plan.run_end(offset) - offset, self.per_execution, self.total_steps - step,
                self._to_next(step, self.eval_every), self._to_next(step, self.checkpoint_every),
                self._to_next(step, log_every_steps))
        started = time.perf_counter()
        pending_loss.append(self.train_chunk(iterators[group], tf.constant(n, tf.int32)))
        self.timings.train_call(time.perf_counter() - started, n)
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
          with self.timings.phase("checkpoints"):
            self.checkpoints.save(step, {**state, "step": step, "train_seconds":
                                         state["train_seconds"] + self._seconds()})
          if self.chief:
            log(f"{label}{task.name}: saved checkpoint at step {step}")
        self._session["other_seconds"] += time.time() - t0

    if state["best_score"] is not None and state["best_step"] != step:
      self._copy(self.best_weights, self.model.weights)
    if not isinstance(self.original_body, model_cache.BodyWeights):  # the caller's body
      for target, source in zip(self.original_body.weights, self.body.weights):
        target.assign(source.numpy())
    test = self.evaluate("test") if evaluate_test else None
    if writer is not None:
      writer.flush()
    seconds = state["train_seconds"] + time.time() - self._session["start"]
    timings = self.timings.finish()
    log(f"{label}{task.name}: {timings_lib.describe(timings)}")
    return FinetuneResult(state["best_metrics"], test, step, state["best_step"],
                          step * self.global_batch, seconds, state["history"], resumed_from,
                          timings)

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

