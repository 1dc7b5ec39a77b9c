"""Fine-tuning a keras-hub body with Keras 3 ``fit``, on the TensorFlow or the JAX backend.

The recipe is the transformers-TF trainer's (:mod:`cold_fusion_tf.training.trainer`): AdamW
with linear warm-up and decay, no weight decay on LayerNorm weights and biases, global-norm
gradient clipping, a fresh head over the first token, dev evaluation every ``eval_every``
steps, early stopping with patience, the best dev weights restored at the end (the model and
optimizer are :mod:`cold_fusion_tf.training.keras_task`'s). Keras 3 gives the rest:

* ``compile(steps_per_execution=...)`` and the optimizer's ``gradient_accumulation_steps``
  (one ``fit`` step is one micro-batch; the optimizer steps every ``accumulation`` of them);
* ``BackupAndRestore``: the training state (weights, optimizer, epoch) at every ``fit``
  epoch end, in ``<workdir>/checkpoints/keras_hub``. Running the same command again resumes;
  it is kept after ``fit`` (the contributor deletes it once its upload is read back), so a
  run stopped before or during its upload does not train again;
* ``EarlyStopping(restore_best_weights=True)`` on the dev score, its state (best score and
  weights, evaluations without gain) kept beside the backup so a resumed run still knows
  the best weights;
* ``TensorBoard`` scalars (loss, learning rate, examples/s, dev metrics) in
  ``<workdir>/tensorboard``;
* distribution: under a ``tf.distribute`` strategy on TensorFlow (each replica reads its
  share of the batch through ``distribute_datasets_from_function``), under
  ``keras.distribution.DataParallel`` on JAX (Keras shards each global batch over the
  devices).

One ``fit`` epoch is one evaluation period (or a divisor of it, so that a backup is taken at
least every ``checkpoint_every_steps`` steps). Batches are the length-grouped ones of
:mod:`cold_fusion_tf.training.inputs`, planned per data epoch from the seed; the input
pipeline starts at the step the optimizer was restored at, so a resumed run sees the data an
uninterrupted one would have. On JAX every batch length is compiled once, so lengths are
rounded up to a few buckets (``recipe.length_buckets``, default 8).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from typing import Callable

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from cold_fusion_tf.data import TaskData
from cold_fusion_tf.errors import UserError
from cold_fusion_tf.model.keras_hub_names import to_numpy
from cold_fusion_tf.training import checkpoints as checkpointing
from cold_fusion_tf.training import distribute as strategies
from cold_fusion_tf.training import inputs
from cold_fusion_tf.training.keras_distribution import KerasDistribution, batch_split, describe
from cold_fusion_tf.training.keras_task import (head_weights, make_optimizer, non_trainable,
                                                task_model)
from cold_fusion_tf.training import metrics as metrics_lib
from cold_fusion_tf.training.common import (FinetuneResult, duration_text,
                                            linear_schedule_value, plan_steps,
                                            recipe_fingerprint)
from cold_fusion_tf.training.recipe import Recipe

_STATE = "early_stopping.json"
_BEST = "best_weights.npz"


# ---------------------------------------------------------------------------------------------
# The run

def finetune(body, tokenizer, task: TaskData, recipe, *, strategy=None, evaluate_test=False,
             log: Callable[[str], None] = logging.info, label: str = "",
             workdir: str | None = None, run_key: str = "") -> FinetuneResult:
  """Fine-tunes a :class:`~cold_fusion_tf.model.keras_hub_body.KerasHubBody` (in place) with a
  fresh head on ``task``; returns its metrics.

  ``strategy``: a ``tf.distribute`` strategy (TensorFlow backend) or a
  :class:`KerasDistribution` (JAX); the body's variables must have been made in its scope
  (``keras_hub_body.load(..., scope=strategy.scope())``). With ``workdir`` the run backs up
  its state there and resumes from it (``run_key`` is part of the run's fingerprint).
  """
  recipe = Recipe.from_config(recipe)
  head = None
  if recipe.probe_epochs:
    head = probe_head(body, tokenizer, task, recipe, strategy=strategy, log=log, label=label,
                      workdir=workdir)
  return _Run(body, tokenizer, task, recipe, strategy, log, label, workdir, run_key,
              head=head).run(evaluate_test)


def probe_head(body, tokenizer, task: TaskData, recipe: Recipe, *, strategy=None,
               log: Callable[[str], None] = logging.info, label: str = "",
               workdir: str | None = None) -> list:
  """The head of a fine-tune's probe phase (LP-FT), as
  :func:`cold_fusion_tf.training.trainer.probe_head` makes it: ``recipe.probe_epochs``
  passes that train a fresh head on the frozen body (no dropout) at
  ``recipe.probe_learning_rate``, its best dev weights. With ``workdir`` it shares the
  fine-tune's token cache (and writes nothing else there)."""
  probe = recipe.replace(epochs=recipe.probe_epochs, learning_rate=recipe.probe_learning_rate,
                         max_steps=0, probe_epochs=0.0, checkpoint_every_steps=0)
  run = _Run(body, tokenizer, task, probe, strategy, log, f"{label}probe: ", None, "",
             frozen=True, tokens=inputs.token_cache(workdir))
  with non_trainable(body.encoder):
    run.run(False)
  return head_weights(run.model)


def throughput(body, tokenizer, task: TaskData, recipe, *, steps: int, strategy=None) -> dict:
  """Times ``steps`` training steps of :func:`finetune`'s ``fit`` (the first epoch's planned
  batches; no evaluation, no backups). The same steps run once untimed first, so every batch
  length is compiled (JAX) or traced (TensorFlow) before the clock starts, as it is early in a
  long run. Returns the fields of :func:`cold_fusion_tf.training.trainer.throughput`."""
  recipe = Recipe.from_config(recipe).replace(checkpoint_every_steps=0, max_steps=steps)
  run = _Run(body, tokenizer, task, recipe, strategy, lambda _: None, "", None, "")
  if run.total_steps < steps:
    raise UserError(f"{task.name}: {run.total_steps} training steps; fewer than {steps} asked "
                    "for.")
  model = run.compiled_model()
  fit_steps = steps * run.accumulation
  for _ in range(2):  # untimed, then timed
    position = _DataPosition(run.accumulation)
    position.step = 0
    start = time.perf_counter()
    history = run.fit(model, position, [position], 1, fit_steps)
    seconds = time.perf_counter() - start
  train = run.encoded["train"]
  rows = run.rows[:fit_steps]
  return {"examples": int(rows.size), "seconds": seconds,
          "real_tokens": int(train.lengths[rows].sum()),
          "padded_tokens": int((run.widths[:fit_steps] * rows.shape[1]).sum()),
          "lengths": train.lengths[rows].reshape(-1).tolist(),
          "widths": run.widths[:fit_steps].tolist(), "batch_size": int(rows.shape[1]),
          "mean_loss": float(history.history["loss"][-1])}


class _Run:
  """One fine-tuning run (see :func:`finetune`)."""

  def __init__(self, body, tokenizer, task, recipe, strategy, log, label, workdir, run_key,
               head=None, frozen=False, tokens=None):
    self.body, self.task, self.recipe, self.log, self.label = body, task, recipe, log, label
    self.head, self.frozen, self.model = head, frozen, None
    self.jax = keras.backend.backend() == "jax"
    if strategy is None:
      strategy = KerasDistribution(None, keras.distribution.list_devices()[:1]) if self.jax \
          else tf.distribute.get_strategy()
    if not self.jax and strategies.is_tpu(strategy):
      raise UserError("the keras_hub body runs on TPUs with the JAX backend "
                      "(--config.model.backend=jax); TensorFlow TPUs need "
                      "--config.model.body=transformers_tf.")
    self.strategy = strategy
    self.replicas = strategy.num_replicas_in_sync
    self.accumulation, _ = batch_split(recipe, strategy)
    self.eval_batch = -(-recipe.eval_batch_size // self.replicas) * self.replicas
    self.label_dtype = tf.float32 if task.kind == "regression" else tf.int32
    self.chief = strategies.is_chief(strategy)
    self.workdir = workdir

    max_length = min(recipe.max_length, body.max_positions)
    cache = tokens or inputs.token_cache(workdir)
    self.tokenize = lambda split: inputs.encode(tokenizer, task.splits[split], max_length, cache,
                                                body_type=body.body_type)
    self.encoded = inputs.start_splits(self.tokenize, task.kind)
    train = self.encoded["train"]
    # JAX compiles each batch length once: a few length buckets (multiples of 8).
    static = self.jax or recipe.static_shapes
    num_buckets = recipe.length_buckets or (8 if static else 0)
    multiple = 8 if static or strategies.uses_gpu(strategy) else 1
    self.buckets = inputs.bucket_lengths(max_length, train.lengths, num_buckets, multiple)
    steps = plan_steps(recipe, task.name, len(train), self.replicas, self.accumulation)
    self.global_batch, self.micro, self.notes = steps.global_batch, steps.micro, steps.notes
    self.steps_per_epoch, self.total_steps = steps.steps_per_epoch, steps.total_steps
    self.eval_every = min(steps.eval_every, self.total_steps)
    # One fit epoch: the evaluation period, or its largest divisor within the backup period.
    period = self.eval_every
    if recipe.checkpoint_every_steps and recipe.checkpoint_every_steps < period:
      period = max(d for d in range(1, recipe.checkpoint_every_steps + 1)
                   if self.eval_every % d == 0)
    self.epoch_steps = period
    self.fit_epoch = period * self.accumulation
    log_period = recipe.log_every_steps * self.accumulation or self.fit_epoch
    self.per_execution = max(d for d in range(1, recipe.steps_per_execution + 1)
                             if self.fit_epoch % d == 0 and log_period % d == 0)
    if not self.jax and self.replicas > 1 and self.per_execution > 1:
      # Keras 3's multi-step loop fails under a multi-replica tf.distribute strategy
      # ("You must feed a value for placeholder tensor", keras-team/keras#19246).
      self.per_execution = 1
      self.notes.append("steps_per_execution 1: Keras 3 cannot run several steps per call "
                        "under a multi-replica TensorFlow strategy")
    self.fingerprint = {
        "body": body.body_type, "backend": keras.backend.backend(), "task": task.name,
        "train_examples": len(train), "kind": task.kind, "num_outputs": task.num_outputs,
        "batch_size": self.global_batch, "accumulation": self.accumulation,
        "total_steps": self.total_steps, "epoch_steps": self.epoch_steps, "seed": recipe.seed,
        "learning_rate": recipe.learning_rate, "max_length": max_length,
        "buckets": self.buckets, "run_key": run_key, **recipe_fingerprint(recipe)}
    if recipe.probe_epochs:
      self.fingerprint.update(probe_epochs=recipe.probe_epochs,
                              probe_learning_rate=recipe.probe_learning_rate)
    self.rows, self.widths = self._plan()

  def _plan(self) -> tuple[np.ndarray, np.ndarray]:
    """The examples [fit steps, micro-batch x replicas] and padded length of every fit step
    (a micro-batch of the global batch), epoch after epoch as the seed plans them."""
    train = self.encoded["train"]
    steps = []
    for epoch in range(-(-self.total_steps // self.steps_per_epoch)):
      plan = inputs.plan_epoch(train.lengths, self.global_batch, self.buckets,
                               seed=self.recipe.seed + 1000 * epoch, static_shapes=False)
      steps.append(plan.batches)
    rows = np.concatenate(steps)[:self.total_steps]
    rows = rows.reshape(self.total_steps * self.accumulation, -1)
    widths = np.asarray([inputs.width_of(int(train.lengths[r].max()), self.buckets)
                         for r in rows], np.int32)
    return rows, widths

  # ------------------------------------------------------------------------------------------
  # Data

  def _datasets(self, dataset_fn):
    if self.jax:
      return dataset_fn(tf.distribute.InputContext())
    return self.strategy.distribute_datasets_from_function(dataset_fn)

  def _train_data(self, position: "_DataPosition"):
    """Every fit step's micro-batch from the restored step on (read when ``fit`` starts
    iterating, after ``BackupAndRestore`` has restored the optimizer)."""
    features_fn = inputs.make_features_fn(self.encoded["train"], self.body.input_names,
                                          self.label_dtype, None, False)

    def dataset_fn(context):
      rows = inputs._replica_rows(self.rows, context)  # pylint: disable=protected-access
      local = len(rows) // len(self.rows)
      table = tf.constant(rows)
      widths = tf.constant(np.repeat(self.widths, local))
      ds = tf.data.Dataset.from_generator(
          lambda: range((position.step or 0) * local, len(rows)),
          output_signature=tf.TensorSpec((), tf.int64))
      ds = ds.map(lambda i: features_fn(tf.gather(table, i), tf.gather(widths, i)),
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
      options = tf.data.Options()
      options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
      return ds.with_options(options).prefetch(tf.data.AUTOTUNE)

    return self._datasets(dataset_fn)

  def predict(self, model, split: str) -> np.ndarray:
    """Model outputs for every example of ``split``, in the split's order."""
    if split not in self.encoded:
      self.encoded[split] = self.tokenize(split)
    encoded = self.encoded[split]
    plan = inputs.eval_plan(encoded.lengths, self.eval_batch, self.buckets, self.jax)
    fn = inputs.replica_dataset_fn(encoded, plan, np.arange(len(plan)), self.body.input_names,
                                   self.label_dtype, width=None)
    raw = model.predict(self._datasets(fn), steps=len(plan), verbose=0)
    rows = plan.batches.reshape(-1)
    outputs = np.zeros((len(encoded), self.task.num_outputs), np.float32)
    outputs[rows[rows >= 0]] = np.asarray(raw, np.float32)[rows >= 0]
    return outputs

  def evaluate(self, model, split: str) -> dict[str, float]:
    outputs = self.predict(model, split)
    return metrics_lib.task_metrics(self.task.kind, self.encoded[split].labels, outputs)

  # ------------------------------------------------------------------------------------------
  # The loop

  def compiled_model(self):
    """The body with its head (a probe phase's, else a fresh one), compiled with the recipe's
    loss and optimizer."""
    recipe = self.recipe
    keras.utils.set_random_seed(recipe.seed)
    with self.strategy.scope():
      model = task_model(self.body, self.task.num_outputs, recipe.seed,
                         recipe.mixed_precision or None, head=self.head, frozen=self.frozen)
      loss = (keras.losses.MeanSquaredError() if self.task.kind == "regression"
              else keras.losses.SparseCategoricalCrossentropy(from_logits=True))
      optimizer = make_optimizer(recipe, self.total_steps, self.accumulation,
                                 model.trainable_variables)
      model.compile(optimizer=optimizer, loss=loss, steps_per_execution=self.per_execution,
                    jit_compile=True if self.jax else recipe.jit_compile)
      optimizer.build(model.trainable_variables)
    return model

  def fit(self, model, position: "_DataPosition", callbacks, epochs: int, epoch_steps: int):
    # On JAX the distribution must also be current while fit shards the batches.
    with self.strategy.scope() if self.jax else contextlib.nullcontext():
      return model.fit(self._train_data(position), epochs=epochs, steps_per_epoch=epoch_steps,
                       callbacks=callbacks, shuffle=False, verbose=0)

  def run(self, evaluate_test: bool) -> FinetuneResult:
    recipe, label, task = self.recipe, self.label, self.task
    model = self.model = self.compiled_model()
    directory = None
    if self.workdir and recipe.checkpoint_every_steps:
      directory = checkpointing.join(self.workdir, "checkpoints", "keras_hub")
      self._check_fingerprint(directory)
    position = _DataPosition(self.accumulation)
    progress = _Progress(self, position)
    stopping = _DevEarlyStopping(self, progress, directory)
    callbacks = [position, progress, stopping]
    if self.workdir and self.chief:
      callbacks.append(keras.callbacks.TensorBoard(
          checkpointing.join(self.workdir, "tensorboard"), write_graph=False, profile_batch=0))
    if directory:
      # Kept after fit: the contributor deletes <workdir>/checkpoints only once its upload
      # is read back, so a run stopped before (or during) the upload resumes from here.
      callbacks.append(keras.callbacks.BackupAndRestore(checkpointing.join(directory, "backup"),
                                                        delete_checkpoint=False))

    self.log(f"{label}training {task.name}: {len(self.encoded['train'])} examples, "
        f"{self.total_steps} steps of {self.global_batch} "
        f"({self.micro} per replica x {self.replicas} replica(s) x {self.accumulation} "
        f"accumulation), lr {recipe.learning_rate:g}, Keras 3 ({keras.backend.backend()}), "
        f"{describe(self.strategy)}")
    for note in self.notes:
      self.log(f"{label}{note}")
    start = time.time()
    self.fit(model, position, callbacks, -(-self.total_steps // self.epoch_steps), self.fit_epoch)
    steps = int(to_numpy(model.optimizer.iterations))
    with self.strategy.scope() if self.jax else contextlib.nullcontext():
      test = self.evaluate(model, "test") if evaluate_test else None
    best = stopping.best_record()
    return FinetuneResult(
        dev={k[len("dev_"):]: v for k, v in best.items() if k.startswith("dev_")}, test=test,
        steps=steps, best_step=best["step"], examples_seen=steps * self.global_batch,
        seconds=stopping.seconds + time.time() - start, history=stopping.history,
        resumed_from=position.resumed_from)

  def _check_fingerprint(self, directory: str) -> None:
    path = checkpointing.join(directory, "run.json")
    mine = json.dumps(self.fingerprint, sort_keys=True)
    if tf.io.gfile.exists(path):
      with tf.io.gfile.GFile(path, "r") as f:
        if f.read() != mine:
          raise UserError(f"{directory} holds the backup of another run (another task, batch, "
                          "schedule or base); delete it or use another --workdir.")
      return
    if self.chief:
      tf.io.gfile.makedirs(directory)
      with tf.io.gfile.GFile(path, "w") as f:
        f.write(mine)


class _DataPosition(keras.callbacks.Callback):
  """Reads the optimizer's step once ``fit`` has restored a backup, before the input pipeline
  starts: the fit step the data resumes at."""

  def __init__(self, accumulation: int):
    super().__init__()
    self.accumulation, self.step, self.resumed_from = accumulation, None, 0

  def on_epoch_begin(self, epoch, logs=None):
    if self.step is None:
      self.resumed_from = int(to_numpy(self.model.optimizer.iterations))
      self.step = self.resumed_from * self.accumulation


class _Progress(keras.callbacks.Callback):
  """Progress lines (loss, learning rate, examples/s, ETA), a stop at the last step, and an
  error when the loss stops being finite."""

  def __init__(self, run: _Run, position: _DataPosition):
    super().__init__()
    self.run, self.position = run, position
    self.other_seconds = 0.0  # time in evaluations and backups, not training

  def on_train_begin(self, logs=None):
    self.start = self.last_log = time.time()
    self.epoch, self.pending = 0, (0, 0.0)

  def on_epoch_begin(self, epoch, logs=None):
    self.epoch, self.epoch_seen = epoch, (0, 0.0)

  def on_train_batch_end(self, batch, logs=None):
    run = self.run
    fit_step = min(self.epoch * run.fit_epoch + batch + 1,
                   run.total_steps * run.accumulation)
    if fit_step >= run.total_steps * run.accumulation:
      self.model.stop_training = True
    count = batch + 1  # logs["loss"] is the mean over this epoch's steps so far
    total = float(logs["loss"]) * count
    seen_count, seen_total = self.epoch_seen
    self.epoch_seen = (count, total)
    n, loss_sum = self.pending
    self.pending = (n + count - seen_count, loss_sum + total - seen_total)
    if not math.isfinite(total):
      raise UserError(f"{run.task.name}: the training loss became {total} by step "
                      f"{fit_step // run.accumulation}; lower --config.recipe.learning_rate.")
    every = run.recipe.log_every_steps
    step = fit_step // run.accumulation
    if (time.time() - self.last_log >= run.recipe.log_every_seconds
        or (every and step % every == 0) or self.model.stop_training):
      self._log(step)

  def rate(self, step: int) -> float:
    busy = time.time() - self.start - self.other_seconds
    return (step - self.position.resumed_from) * self.run.global_batch / max(busy, 1e-9)

  def _log(self, step: int) -> None:
    run = self.run
    n, loss_sum = self.pending
    if not n:
      return
    self.pending, self.last_log = (0, 0.0), time.time()
    rate = self.rate(step)
    eta = (run.total_steps - step) * run.global_batch / max(rate, 1e-9)
    lr = self.learning_rate(step)
    run.log(f"{run.label}{run.task.name} step {step}/{run.total_steps} loss {loss_sum / n:.4f} "
            f"lr {lr:.3g} {rate:.1f} examples/s ETA {duration_text(eta)}")

  def learning_rate(self, step: int) -> float:
    recipe = self.run.recipe
    warmup = int(math.ceil(recipe.warmup_fraction * self.run.total_steps))
    return linear_schedule_value(step, recipe.learning_rate, warmup, self.run.total_steps)

  def on_epoch_end(self, epoch, logs=None):
    step = min((epoch + 1) * self.run.epoch_steps, self.run.total_steps)
    if logs is not None:  # for TensorBoard
      logs["learning_rate"] = self.learning_rate(step)
      logs["examples_per_second"] = self.rate(step)


class _DevEarlyStopping(keras.callbacks.EarlyStopping):
  """``EarlyStopping(restore_best_weights=True)`` on the dev score, which it computes at the
  end of every epoch that closes an evaluation period (``val_score`` and ``val_<metric>`` in
  the epoch's logs). With a ``directory`` its state is kept there after every evaluation, so
  a run resumed from ``BackupAndRestore`` still knows the best weights and the patience."""

  def __init__(self, run: _Run, progress: _Progress, directory: str | None):
    recipe = run.recipe
    if recipe.patience_examples:
      patience = -(-recipe.patience_examples // (run.eval_every * run.global_batch))
    else:
      patience = recipe.patience_evals or 1 << 30
    super().__init__(monitor="val_score", mode="max", patience=patience,
                     restore_best_weights=True)
    self.run, self.progress, self.directory = run, progress, directory
    self.history: list[dict] = []
    self.seconds = 0.0  # training time of earlier sessions of this run
    self.done_epochs = -1

  def on_train_begin(self, logs=None):
    super().on_train_begin(logs)
    state = self._read(_STATE)
    if state is None:
      return
    state = json.loads(state)
    self.best, self.best_epoch, self.wait = state["best"], state["best_epoch"], state["wait"]
    self.history, self.seconds = state["history"], state["seconds"]
    self.done_epochs = state["epoch"]
    best = self._read(_BEST, binary=True)
    if best is not None:
      with np.load(io.BytesIO(best), allow_pickle=False) as data:
        self.best_weights = [data[f"w{i}"] for i in range(len(data.files))]

  def on_epoch_end(self, epoch, logs=None):
    run = self.run
    step = min((epoch + 1) * run.epoch_steps, run.total_steps)
    if epoch <= self.done_epochs or not (step % run.eval_every == 0 or step == run.total_steps):
      return
    start = time.time()
    dev = run.evaluate(self.model, "dev")
    logs.update({f"val_{k}": v for k, v in dev.items()})
    self.history.append({"step": step, "loss": float(logs.get("loss", float("nan"))),
                         **{f"dev_{k}": v for k, v in dev.items()}})
    best = self.best
    super().on_epoch_end(epoch, logs)
    if self.stopped_epoch == epoch and self.model.stop_training and step < run.total_steps:
      run.log(f"{run.label}{run.task.name}: early stop at step {step} "
              f"(best step {self.best_record()['step']})")
    if self.directory and run.chief:
      if self.best != best:
        buffer = io.BytesIO()
        np.savez(buffer, **{f"w{i}": w for i, w in enumerate(self.best_weights)})
        self._write(_BEST, buffer.getvalue())
      self._write(_STATE, json.dumps({
          "best": self.best, "best_epoch": self.best_epoch, "wait": self.wait, "epoch": epoch,
          "history": self.history,
          "seconds": self.seconds + time.time() - self.progress.start}).encode())
    self.progress.other_seconds += time.time() - start

  def best_record(self) -> dict:
    """The history entry of the best dev score (the first of equals, as early stopping keeps)."""
    return max(self.history, key=lambda h: (h["dev_score"], -h["step"]))

  def _read(self, name: str, binary: bool = False):
    if not self.directory:
      return None
    path = checkpointing.join(self.directory, name)
    if not tf.io.gfile.exists(path):
      return None
    with tf.io.gfile.GFile(path, "rb" if binary else "r") as f:
      return f.read()

  def _write(self, name: str, data: bytes) -> None:
    path = checkpointing.join(self.directory, name)
    tf.io.gfile.makedirs(self.directory)
    with tf.io.gfile.GFile(path + ".tmp", "wb") as f:
      f.write(data)
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
