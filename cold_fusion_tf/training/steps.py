"""The traced step functions of a fine-tune: training chunks and prediction.

* ``train_chunk(iterator, steps)`` runs ``steps`` optimizer steps inside one ``tf.function``
  (a ``tf.range`` loop over a distributed iterator): no Python per step; it returns the summed
  loss, read back only when it is logged. The global batch is split across replicas (and, with
  gradient accumulation, into micro-batches) and the loss is the sum over the global batch
  divided by its size, so gradients mean the same whatever the split.
* ``predict_step(iterator)`` returns one batch's outputs and example indices, gathered from
  every replica.

Both close over the model's variables, never over a run's settings: a run's learning rate,
length and seed live in variables, so one traced pair serves every fine-tune of the same
shapes (:mod:`cold_fusion_tf.training.model_cache`).
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf
import tf_keras as keras

from cold_fusion_tf.training import dropout as dropout_lib


def loss_fn(kind: str) -> Callable:
  """Per-example loss: squared error for regression, cross-entropy on logits otherwise."""
  if kind == "regression":
    return lambda labels, outputs: tf.square(tf.reshape(outputs, [-1]) - labels)
  return lambda labels, outputs: keras.losses.sparse_categorical_crossentropy(
      labels, outputs, from_logits=True)


def make_train_chunk(model, optimizer, variables, strategy, *, kind: str, global_batch: int,
                     accumulation: int, micro: int, jit_compile: bool,
                     seeds: dropout_lib.StepSeeds, run_seed):
  """The training function (see the module docstring); dropout draws from ``seeds`` under
  the seed of (``run_seed``, step, replica, micro-batch)."""
  loss_of = loss_fn(kind)
  dense = strategy.num_replicas_in_sync > 1 or accumulation > 1

  def gradients(features, labels, seed):
    with tf.GradientTape() as tape, seeds.trace(seed):
      outputs = tf.cast(model(features, training=True), tf.float32)
      loss = tf.nn.compute_average_loss(loss_of(labels, outputs), global_batch_size=global_batch)
    grads = tape.gradient(loss, variables)
    grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables)]
    if dense:  # sparse (IndexedSlices) all-reduces inside a step loop can go out of step
      grads = [tf.convert_to_tensor(g) for g in grads]
    return grads, loss

  if jit_compile:
    gradients = tf.function(gradients, jit_compile=True, autograph=False)

  def replica_step(features, labels):
    replica = tf.distribute.get_replica_context().replica_id_in_sync_group
    seed = dropout_lib.step_seed(run_seed, optimizer.iterations, replica)
    if accumulation == 1:
      grads, loss = gradients(features, labels, seed)
    else:
      split = {k: tf.reshape(v, tf.concat([[accumulation, micro], tf.shape(v)[1:]], 0))
               for k, v in features.items()}
      split_labels = tf.reshape(labels, [accumulation, micro])

      def body(i, loss, *acc):
        part_seed = tf.random.experimental.stateless_fold_in(seed, i)  # i: int32
        grads, part = gradients({k: v[i] for k, v in split.items()}, split_labels[i], part_seed)
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

    _, total = tf.while_loop(lambda i, _: i < steps, one_step, (tf.constant(0), tf.constant(0.0)))
    return total

  return train_chunk


def make_predict_step(model, strategy):
  """The prediction function (see the module docstring)."""

  def replica_predict(features):
    return tf.cast(model(features, training=False), tf.float32), features["index"]

  @tf.function(autograph=False)
  def predict_step(iterator):
    features, _ = next(iterator)
    outputs, index = strategy.run(replica_predict, args=(features,))
    return strategy.gather(outputs, axis=0), strategy.gather(index, axis=0)

  return predict_step
